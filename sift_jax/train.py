"""The one trainer: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config, build data, model, optimizer and sparsity
rule, initialise or resume the state, then loop over jitted steps with logging,
evaluation and checkpoints, and write the run's summary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from sift_jax import (
  checkpointing,
  data,
  flops,
  hostmem,
  launch,
  models,
  optim,
  preemption,
  sharding,
  sparsity,
)
from sift_jax import metrics as metrics_lib
from sift_jax.analysis import spectral
from sift_jax.config_lib import RUN_LENGTH_KEYS
from sift_jax.models.layers import sparse_kernel_paths
from sift_jax.sift import report as sift_report
from sift_jax.state import TrainState

MODES = ('train', 'eval')


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or Inf; nothing after the last good checkpoint is saved."""


class Preempted(Exception):
  """SIGTERM/SIGINT (or a multi-host preemption notice): a checkpoint was saved, exit 0."""


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Checks the top-level keys; each subsystem checks its own group when it is built."""
  for key in ('total_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    if not isinstance(c[key], int) or c[key] < 0:
      raise ValueError(f'{key}={c[key]!r} must be a non-negative integer')
  if c.total_steps == 0:
    raise ValueError('total_steps=0: nothing to train (it must be a positive integer)')
  if c.log_every_steps == 0:
    raise ValueError('log_every_steps=0 must be a positive integer')
  accum = c.optim.grad_accum_steps
  if accum < 1 or c.batch_size % accum:
    raise ValueError(
      f'optim.grad_accum_steps={accum} must be a positive divisor of batch_size={c.batch_size}'
    )


def use_compilation_cache() -> None:
  """A persistent XLA cache, so reruns and the test suite do not recompile the same steps."""
  cache = os.environ.get('SIFT_JAX_COMPILATION_CACHE') or os.path.join(
    os.path.expanduser('~'), '.cache', 'sift_jax', 'xla'
  )
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


# --------------------------------------------------------------------------- losses


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-position cross-entropy in float32; logits (..., V), labels (...)."""
  logits = logits.astype(jnp.float32)
  if label_smoothing == 0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def inputs_and_labels(batch: dict[str, jax.Array], kind: str) -> tuple[jax.Array, jax.Array]:
  if kind == 'text':
    return batch['inputs'], batch['targets']  # (B, T), (B, T)
  return batch['image'], batch['label']  # (B, H, W, C), (B,)


# --------------------------------------------------------------------------- steps


def make_train_step(model, tx, schedule, rule, kind: str, c: ml_collections.ConfigDict):
  """Returns the pure step (state, batch) -> (state, metrics); the caller jits it.

  The data flow is DESIGN.md's: gradients are taken w.r.t. the weights the forward pass uses
  (dense even where masked: RigL's grow score), the rule maps them to the params, the optimizer
  step is masked afterwards, then the rule updates masks under lax.cond on its schedule. A rule
  that needs layer inputs and output gradients (GSE) gets them through zero perturbations.
  """
  accum = c.optim.grad_accum_steps
  smoothing = c.optim.label_smoothing

  def loss_fn(fwd_params, perts, model_state, batch, rng):
    x, y = inputs_and_labels(batch, kind)
    variables = {'params': fwd_params, **model_state}
    mutable = list(model_state)
    if rule.needs_aux:
      variables['perturbations'] = perts
      mutable.append('intermediates')
    with rule.capture():
      logits, mutated = model.apply(
        variables, x, train=True, rngs={'dropout': rng}, mutable=mutable
      )
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
      x0, _ = inputs_and_labels(jax.tree.map(lambda v: v[0], micro), kind)
      perts = rule.zero_perturbations(model, {'params': fwd, **state.model_state}, x0, train=False)

    # A Python loop, not lax.scan: XLA:CPU runs the convolutions of a scan body up to 20x
    # slower (benchmarks/step_time.py), and accumulation counts are small.
    model_state, g_fwd, loss, correct, captured = state.model_state, None, 0.0, 0.0, []
    for i in range(accum):
      (loss_i, (model_state, acc, inputs)), (g, g_out) = grad_fn(
        fwd,
        perts,
        model_state,
        jax.tree.map(lambda v, i=i: v[i], micro),
        jax.random.fold_in(rng, i),
      )
      g_fwd = g if g_fwd is None else jax.tree.map(jnp.add, g_fwd, g)
      loss, correct = loss + loss_i, correct + acc
      captured.append((inputs, g_out))
    g_fwd = jax.tree.map(lambda g: g / accum, g_fwd)
    aux = None
    if rule.needs_aux:
      # Rows of all microbatches side by side; output grads scaled like the averaged gradient.
      inputs, g_out = jax.tree.map(lambda *v: jnp.concatenate(v), *captured)
      aux = {'intermediates': inputs, 'perturbations': jax.tree.map(lambda g: g / accum, g_out)}

    grads = rule.param_grads(state.sparsity, state.params, g_fwd)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = rule.mask_updates(state.sparsity, updates)
    params = optax.apply_updates(state.params, updates)
    sstate, params, opt_state = rule.update(
      state.sparsity, params, g_fwd, opt_state, state.step, rng, aux
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


def make_eval_step(model, rule, kind: str):
  """Returns (state, batch) -> sums of loss, correct predictions and weight over the batch."""

  def step(state: TrainState, batch: dict[str, jax.Array]):
    x, y = inputs_and_labels(batch, kind)
    fwd = rule.forward_params(state.sparsity, state.params)
    logits = model.apply({'params': fwd, **state.model_state}, x, train=False)
    loss = cross_entropy(logits, y, 0.0)
    correct = (logits.argmax(-1) == y).astype(jnp.float32)
    w = batch['weights']  # (B,): 0 for padding rows
    if kind == 'text':
      w = jnp.broadcast_to(w[:, None], y.shape)  # (B, T)
    return {'loss': (loss * w).sum(), 'correct': (correct * w).sum(), 'weight': w.sum()}

  return step


def evaluate(eval_step, state: TrainState, dataset, mesh) -> dict[str, float]:
  totals = {'loss': 0.0, 'correct': 0.0, 'weight': 0.0}
  for local in dataset.eval_batches():
    sums = jax.device_get(eval_step(state, sharding.global_batch(mesh, local)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  if totals['weight'] == 0:
    raise ValueError('the eval split is empty (check eval.max_examples and the data)')
  loss = totals['loss'] / totals['weight']
  out = {'eval/loss': loss, 'eval/accuracy': totals['correct'] / totals['weight']}
  if dataset.kind == 'text':
    out['eval/perplexity'] = float(np.exp(min(loss, 80.0)))
  return out


# --------------------------------------------------------------------------- workdir


def flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def check_workdir_config(c: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir whose saved config differs in more than run-length keys."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  new = flatten(json.loads(c.to_json()))
  old = flatten(saved)
  diff = sorted(
    k for k in set(new) | set(old) if k not in RUN_LENGTH_KEYS and new.get(k) != old.get(k)
  )
  if diff:
    details = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff[:10])
    raise ValueError(
      f'workdir {workdir} holds a run with a different config ({details}); only run-length '
      f'keys ({", ".join(RUN_LENGTH_KEYS)}) may change on resume. Use a new --workdir.'
    )


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run builds from its config before the first step (benchmarks reuse it)."""

  config: ml_collections.ConfigDict
  mesh: Any
  dataset: Any
  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  rule: Any
  init_state: Any  # rng -> TrainState
  abstract_state: Any  # TrainState of ShapeDtypeStructs carrying the shardings
  flop_report: Any
  sift_flops: Any  # sift.report.SiftFlops of a Sparse-IFT member, None for sift.name = dense

  def state_shardings(self) -> Any:
    return jax.tree.map(lambda a: a.sharding, self.abstract_state)

  def new_state(self) -> TrainState:
    init = jax.jit(self.init_state, out_shardings=self.state_shardings())
    return init(jax.random.PRNGKey(self.config.seed))

  def train_step(self):
    """The jitted train step; it donates the state."""
    step = make_train_step(
      self.model, self.tx, self.schedule, self.rule, self.dataset.kind, self.config
    )
    # Pinned output shardings: the state keeps its fsdp layout step after step (no recompiles).
    out = (self.state_shardings(), sharding.replicated(self.mesh))
    return jax.jit(step, donate_argnums=(0,), out_shardings=out)

  def eval_step(self):
    return jax.jit(make_eval_step(self.model, self.rule, self.dataset.kind))

  def sparsity_metrics(self):
    """The rule's metrics (densities, churn, itop) of a state, jitted: computed on log steps
    only, since counting every mask each step costs ~5% of a small model's step."""
    metrics = jax.jit(self.rule.metrics, out_shardings=sharding.replicated(self.mesh))
    return lambda state: metrics(state.sparsity)


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Checks the config and builds mesh, data, model, optimizer, sparsity rule and FLOP count."""
  validate_config(config)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval.batch_size or config.batch_size, mesh, 'eval.batch_size')
  dataset = data.build_dataset(
    config, process_index=jax.process_index(), process_count=jax.process_count()
  )
  model = models.build_model(config, dataset.meta)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  x_spec = models.example_input(config, dataset.meta, batch_size=1)
  abstract_vars = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), x_spec
  )
  sift_flops = None
  rule_config = config
  if config.sift.name != 'dense':
    # The member is sized by the nominal s; with match_flops its masks hold the solved level.
    sift_flops = sift_report.sift_flops(config, dataset.meta)
    if sift_flops.mask_level != config.sparsity.level:
      rule_config = config.copy_and_resolve_references()
      rule_config.sparsity.level = sift_flops.mask_level
  rule = sparsity.make_rule(
    rule_config, abstract_vars['params'], sparse_kernel_paths(abstract_vars)
  )

  def init_state(rng) -> TrainState:
    k_init, k_sparse, k_train = jax.random.split(rng, 3)
    variables = dict(model.init(k_init, jnp.zeros(x_spec.shape, x_spec.dtype), train=False))
    params = variables.pop('params')
    variables.pop('sparse', None)  # the sparse-kernel declarations; the rule has read them
    sstate, params = rule.init(params, k_sparse)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      model_state=variables,
      opt_state=tx.init(params),
      sparsity=sstate,
      rng=k_train,
    )

  abstract = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    sharding.state_shardings(mesh, abstract, config.mesh.fsdp_min_size),
  )
  return Experiment(
    config=config,
    mesh=mesh,
    dataset=dataset,
    model=model,
    tx=tx,
    schedule=schedule,
    rule=rule,
    init_state=init_state,
    abstract_state=abstract,
    flop_report=flops.count_forward_flops(model, config, dataset.meta),
    sift_flops=sift_flops,
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, mode: str = 'train'
) -> dict[str, Any]:
  """Trains (or, with mode='eval', evaluates the latest checkpoint); returns the summary."""
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; known: {", ".join(MODES)}')
  t_start = time.time()
  use_compilation_cache()
  launch.initialize(config)  # before anything touches a device
  if jax.default_backend() == 'cpu':
    hostmem.keep_freed_memory()
  os.makedirs(workdir, exist_ok=True)
  check_workdir_config(config, workdir)
  exp = build_experiment(config)
  metrics_lib.write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json()))

  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint.keep)
  restored = ckpt.restore_latest(exp.abstract_state)
  if restored is None:
    if mode == 'eval':
      raise FileNotFoundError(f'--mode=eval needs a checkpoint; {ckpt.directory} has none')
    state, start_step = exp.new_state(), 0
  else:
    state, start_step = restored
    logging.info('resumed from %s at step %d', ckpt.directory, start_step)

  writer = metrics_lib.MetricWriter(workdir)
  try:
    if mode == 'eval':
      final = evaluate(exp.eval_step(), state, exp.dataset, exp.mesh)
      writer.write(start_step, final)
      logging.info('eval at step %d: %s', start_step, final)
      return final
    state, final = train_loop(exp, workdir, state, start_step, ckpt, writer)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()

  summary = metrics_lib.plain(
    {
      **final,
      **run_facts(state, exp),
      'resumed_from_step': start_step,
      'wall_time_s': time.time() - t_start,
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      **metrics_lib.provenance(),
    }
  )
  metrics_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
  return summary


def train_loop(exp: Experiment, workdir: str, state, start_step: int, ckpt, writer):
  """Runs steps start_step+1 .. total_steps; returns (final state, last logged metrics)."""
  config, dataset = exp.config, exp.dataset
  total = config.total_steps
  step_fn, eval_step, sparsity_metrics = exp.train_step(), exp.eval_step(), exp.sparsity_metrics()
  unit = 'tokens' if dataset.kind == 'text' else 'examples'
  progress = metrics_lib.Progress(total, start_step, unit)
  final: dict[str, Any] = {}
  batches = dataset.train_iterator(start_step)
  t_last, s_last = time.perf_counter(), start_step
  with preemption.PreemptionGuard() as guard:
    for step in range(start_step + 1, total + 1):
      state, step_metrics = step_fn(state, sharding.global_batch(exp.mesh, next(batches)))
      if guard.should_stop(step):
        check_finite(jax.device_get(step_metrics), step, ckpt)
        ckpt.save(step, state)
        ckpt.wait()
        raise Preempted(
          f'{guard.signal_name or "preemption"} received: saved a checkpoint at step {step} '
          f'in {ckpt.directory}; rerun the same command to resume'
        )
      is_eval = every(step, config.eval_every_steps) or step == total
      is_log = every(step, config.log_every_steps) or is_eval
      is_ckpt = every(step, config.checkpoint_every_steps) or step == total
      if not (is_log or is_ckpt):
        continue
      row = jax.device_get(step_metrics)  # device-to-host only on log and checkpoint steps
      check_finite(row, step, ckpt)
      if is_log:
        now = time.perf_counter()
        row.update(throughput(exp, (now - t_last) / (step - s_last)))
        row.update(jax.device_get(sparsity_metrics(state)))
        densities = sparsity.layer_densities_from_metrics(row)
        row['flops/train_per_example'] = train_flops(exp, densities, step)
        if exp.sift_flops is not None:
          row['sparsity/solved_level'] = exp.sift_flops.mask_level
        if is_eval:
          row.update(evaluate(eval_step, state, dataset, exp.mesh))
          if config.analysis.spectral:
            row.update(spectral.state_metrics(state))  # host-side eigensolves: eval steps only
        writer.write(step, row)
        final.update(row)
        if config.progress and jax.process_index() == 0:
          print(progress.line(step, row), flush=True)
        t_last, s_last = time.perf_counter(), step  # eval time is not step time
      if is_ckpt:
        ckpt.save(step, state)
  return state, final


def every(step: int, period: int) -> bool:
  return bool(period) and step % period == 0


def check_finite(scalars: dict[str, Any], step: int, ckpt) -> None:
  """Stops before a NaN/Inf state can be saved over good checkpoints."""
  if np.isfinite(scalars['train/loss']) and np.isfinite(scalars['train/grad_norm']):
    return
  raise NonFiniteLossError(
    f'step {step}: train/loss={scalars["train/loss"]}, '
    f'train/grad_norm={scalars["train/grad_norm"]}; lower optim.lr or set optim.clip_norm. '
    f'Checkpoints kept untouched: {ckpt.steps() or "none"}.'
  )


def throughput(exp: Experiment, step_time_s: float) -> dict[str, float]:
  out = {
    'train/step_time_s': step_time_s,
    'train/examples_per_s': exp.config.batch_size / step_time_s,
  }
  if exp.dataset.kind == 'text':
    out['train/tokens_per_s'] = out['train/examples_per_s'] * exp.dataset.meta['seq_len']
  return out


def train_flops(exp: Experiment, densities, step: int) -> float:
  """Training FLOPs per example at step `step` and the given per-layer densities."""
  c = exp.config.sparsity
  return flops.training_flops_per_example(
    c.rule,
    exp.flop_report.at_densities(densities),
    exp.flop_report.forward_dense,
    c.update_every_steps,
    updating=step < c.end_fraction * exp.config.total_steps,
  )


def run_facts(state: TrainState, exp: Experiment) -> dict[str, Any]:
  """Parameter counts, norms and FLOPs of the final state for summary.json."""
  params = sharding.fetch(state.params)
  masks = sharding.fetch(sparsity.masks_of(state.sparsity))
  total = int(sum(p.size for p in jax.tree.leaves(params)))
  mask_leaves = jax.tree.leaves(masks)  # dense weights have None masks: no leaves
  sparse = int(sum(m.size for m in mask_leaves))
  active = total - sparse + int(sum(m.sum() for m in mask_leaves))
  layer_density = sparsity.layer_densities(masks)
  return {
    'params/total': total,
    'params/sparse': sparse,
    'params/active': active,
    'params/global_norm': float(optax.global_norm(params)),
    'flops/forward_per_example': exp.flop_report.at_densities(layer_density),
    'flops/forward_per_example_dense': exp.flop_report.forward_dense,
    'flops/train_per_example': train_flops(exp, layer_density, exp.config.total_steps),
    'sparsity/layer_density': {'/'.join(k): v for k, v in layer_density.items()},
    **sift_facts(exp.sift_flops),
  }


def sift_facts(f) -> dict[str, Any]:
  """The Sparse-IFT member against its dense original (SPEC.md section 1's two FLOP figures)."""
  if f is None:
    return {}
  return {
    'sparsity/solved_level': f.mask_level,
    'sift/dense_model_params': f.dense_params,
    'sift/dense_model_forward_per_example': f.dense_forward,
    'sift/forward_relative_to_dense': f.forward / f.dense_forward,
    'sift/transformed_forward_per_example': f.transformed,
    'sift/transformed_forward_per_example_dense_model': f.dense_transformed,
    'sift/transformed_relative_to_dense': f.transformed / f.dense_transformed,
  }
