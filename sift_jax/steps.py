"""The jitted step functions of a run: the train step, the eval step and a whole evaluation.

What a batch holds comes from the data's meta as a `Task`: the next token at every position of a
sequence, or an image's class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sift_jax import sharding
from sift_jax.sparsity import sparse_apply
from sift_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class Task:
  """What a batch holds and what the model predicts (data/__init__.py's two batch layouts)."""

  inputs: str  # the batch key of the model's input
  labels: str  # the batch key of what it predicts
  unit: str  # what throughput counts: one prediction (a token) or one example (an image)

  def inputs_and_labels(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return batch[self.inputs], batch[self.labels]


TOKENS = Task(inputs='inputs', labels='targets', unit='tokens')  # (B, T), (B, T)
IMAGES = Task(inputs='image', labels='label', unit='examples')  # (B, H, W, C), (B,)


def task_of(meta: Mapping[str, Any]) -> Task:
  """The task of a dataset from its meta: a vocabulary means tokens, else classes of images."""
  return TOKENS if 'vocab_size' in meta else IMAGES


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-position cross-entropy in float32; logits (..., V), labels (...)."""
  logits = logits.astype(jnp.float32)
  if label_smoothing == 0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def make_train_step(model, tx, schedule, rule, task: Task, c: ml_collections.ConfigDict):
  """Returns the pure step (state, batch) -> (state, metrics); the caller jits it.

  The data flow is docs/design.md's: gradients are taken w.r.t. the weights the forward pass uses
  (dense even where masked: RigL's grow score), then `sparsity.sparse_apply`: the rule maps them
  to the params, the optimizer step is masked afterwards, then the rule updates masks under
  lax.cond on its schedule. A rule that needs layer inputs and output gradients (GSE) gets them
  through zero perturbations.
  """
  accum = c.optim.grad_accum_steps
  smoothing = c.optim.label_smoothing

  def loss_fn(fwd_params, perts, model_state, batch, rng):
    x, y = task.inputs_and_labels(batch)
    variables = {'params': fwd_params, **model_state}
    mutable = list(model_state)
    if rule.needs_aux:
      variables['perturbations'] = perts
      mutable.append('intermediates')
    logits, mutated = model.apply(variables, x, train=True, rngs={'dropout': rng}, mutable=mutable)
    inputs = mutated.pop('intermediates', None)
    loss = cross_entropy(logits, y, smoothing).mean()
    correct = (logits.argmax(-1) == y).mean()
    return loss, (mutated, correct, inputs)

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    fwd = rule.forward_params(state.sparsity, state.params)
    # Microbatch j takes rows j, j + A, j + 2A, ...: each device keeps its own rows.
    micro = jax.tree.map(
      lambda v: jnp.moveaxis(v.reshape(v.shape[0] // accum, accum, *v.shape[1:]), 1, 0), batch
    )
    perts = None
    if rule.needs_aux:
      x0, _ = task.inputs_and_labels(jax.tree.map(lambda v: v[0], micro))
      perts = rule.zero_perturbations(model, {'params': fwd, **state.model_state}, x0, train=False)

    # A Python loop, not lax.scan: XLA:CPU runs the convolutions of a scan body up to 20x
    # slower (benchmarks/step_time.py), and accumulation counts are small.
    def grads_at(w, i, model_state, perts):  # value and grads of microbatch i at weights w
      batch_i = jax.tree.map(lambda v: v[i], micro)
      return grad_fn(w, perts, model_state, batch_i, jax.random.fold_in(rng, i))

    model_state, g_fwd, loss, correct, captured = state.model_state, None, 0.0, 0.0, []
    for i in range(accum):
      with rule.execute(state.sparsity):  # block-sparse layers, GSE's capture, or nothing
        (loss_i, (model_state, acc, inputs)), (g, g_out) = grads_at(fwd, i, model_state, perts)
      g_fwd = g if g_fwd is None else jax.tree.map(jnp.add, g_fwd, g)
      loss, correct = loss + loss_i, correct + acc
      captured.append((inputs, g_out))
    g_fwd = jax.tree.map(lambda g: g / accum, g_fwd)
    dense_grad = None
    if rule.execution.needs_dense_grad:
      # Block-sparse RigL: the masked model's dense gradient of the same batch at masked-form
      # weights, which the update computes on its update steps only.
      def dense_grad(w):
        gs = [grads_at(w, i, state.model_state, None)[1][0] for i in range(accum)]
        return jax.tree.map(lambda *g: sum(g) / accum, *gs)

    aux = None
    if rule.needs_aux:
      # Rows of all microbatches side by side; output grads scaled like the averaged gradient.
      inputs, g_out = jax.tree.map(lambda *v: jnp.concatenate(v), *captured)
      aux = {'intermediates': inputs, 'perturbations': jax.tree.map(lambda g: g / accum, g_out)}

    sstate, params, opt_state = sparse_apply(
      rule,
      tx,
      state.sparsity,
      state.params,
      state.opt_state,
      g_fwd,
      state.step,
      rng,
      aux=aux,
      dense_grad=dense_grad,
    )
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      model_state=model_state,
      opt_state=opt_state,
      sparsity=sstate,
    )
    step_metrics = {
      'train/loss': loss / accum,
      'train/accuracy': correct / accum,
      'train/grad_norm': optax.global_norm(g_fwd),
      'train/lr': schedule(state.step),
    }
    return new_state, step_metrics

  return step


def make_eval_step(model, rule, task: Task):
  """Returns (state, batch) -> sums of loss, correct predictions and weight over the batch."""

  def step(state: TrainState, batch: dict[str, jax.Array]):
    x, y = task.inputs_and_labels(batch)
    fwd = rule.forward_params(state.sparsity, state.params)
    with rule.execute(state.sparsity):
      logits = model.apply({'params': fwd, **state.model_state}, x, train=False)
    loss = cross_entropy(logits, y, 0.0)
    correct = (logits.argmax(-1) == y).astype(jnp.float32)
    w = batch['weights']  # (B,): 0 for padding rows
    w = jnp.broadcast_to(w.reshape(w.shape + (1,) * (y.ndim - 1)), y.shape)  # one per label
    return {'loss': (loss * w).sum(), 'correct': (correct * w).sum(), 'weight': w.sum()}

  return step


def evaluate(eval_step, state: TrainState, dataset, mesh, task: Task) -> dict[str, float]:
  """eval/loss and eval/accuracy over the eval split (and eval/perplexity of tokens)."""
  totals = {'loss': 0.0, 'correct': 0.0, 'weight': 0.0}
  for local in dataset.eval_batches():
    sums = jax.device_get(eval_step(state, sharding.global_batch(mesh, local)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  if totals['weight'] == 0:
    raise ValueError('the eval split is empty (check eval.max_examples and the data)')
  loss = totals['loss'] / totals['weight']
  out = {'eval/loss': loss, 'eval/accuracy': totals['correct'] / totals['weight']}
  if task == TOKENS:
    out['eval/perplexity'] = float(np.exp(min(loss, 80.0)))
  return out
