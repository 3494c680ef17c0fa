"""The one trainer: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config, build data, model, optimizer and sparsity
rule, initialise or resume the state, then loop over jitted steps with logging,
evaluation and checkpoints, and write the run's summary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
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
  errors,
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
from sift_jax.sparsity import blocked
from sift_jax.state import TrainState

MODES = ('train', 'eval')
# A loss above DIVERGENCE_FACTOR x max(loss of a uniform guess, median of the last
# DIVERGENCE_WINDOW checked losses) counts as divergence: no healthy run jumps that far.
DIVERGENCE_FACTOR = 10.0
DIVERGENCE_WINDOW = 10


class NonFiniteLossError(errors.UserError):
  """Training (or eval) produced a NaN/Inf or an exploding loss, or NaN/Inf weights.

  Nothing after the last good checkpoint is kept: unconfirmed checkpoints are moved to
  checkpoints_diverged/.
  """


class RunStateError(errors.UserError):
  """The workdir's checkpoints do not allow this run: past its end, or lost."""


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

  The data flow is docs/design.md's: gradients are taken w.r.t. the weights the forward pass uses
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
    def grads_at(w, i, model_state, perts):  # value and grads of microbatch i at weights w
      batch_i = jax.tree.map(lambda v: v[i], micro)
      return grad_fn(w, perts, model_state, batch_i, jax.random.fold_in(rng, i))

    model_state, g_fwd, loss, correct, captured = state.model_state, None, 0.0, 0.0, []
    for i in range(accum):
      with blocked.execute(rule, state.sparsity):  # block-sparse layers, or nothing
        (loss_i, (model_state, acc, inputs)), (g, g_out) = grads_at(fwd, i, model_state, perts)
      g_fwd = g if g_fwd is None else jax.tree.map(jnp.add, g_fwd, g)
      loss, correct = loss + loss_i, correct + acc
      captured.append((inputs, g_out))
    g_fwd = jax.tree.map(lambda g: g / accum, g_fwd)
    aux = None
    if isinstance(rule, blocked.BlockRule) and not rule.needs_aux:
      # Block-sparse execution: the masked rule's dense gradient, of the same batch and weights,
      # computed by the rule on its update steps only.
      def dense_grad(w):
        gs = [grads_at(w, i, state.model_state, None)[1][0] for i in range(accum)]
        return jax.tree.map(lambda *g: sum(g) / accum, *gs)

      aux = (dense_grad, state.params)
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
    with blocked.execute(rule, state.sparsity):
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


# Config keys that may change on resume because the restored state is converted to them.
CONVERTED_KEYS = ('sparsity.execution',)


def check_workdir_config(c: ml_collections.ConfigDict, workdir: str) -> int | None:
  """Refuses to resume a workdir whose saved config differs in more than run-length keys.

  Returns the saved run's total_steps when this config changes it (None otherwise): the
  learning-rate and mask-update schedules are functions of it, so the resume line says so.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  new = flatten(json.loads(c.to_json()))
  old = flatten(saved)
  free = RUN_LENGTH_KEYS + CONVERTED_KEYS
  diff = sorted(k for k in set(new) | set(old) if k not in free and new.get(k) != old.get(k))
  if diff:
    details = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff[:10])
    raise ValueError(
      f'workdir {workdir} holds a run with a different config ({details}); only run-length '
      f'keys ({", ".join(RUN_LENGTH_KEYS)}) and {", ".join(CONVERTED_KEYS)} (the state is '
      'converted) may change on resume. Use a new --workdir.'
    )
  return old.get('total_steps') if old.get('total_steps') != new.get('total_steps') else None


def restore(exp: Experiment, ckpt: checkpointing.Checkpointer) -> tuple[Any, int] | None:
  """The latest checkpoint as (state, step); one written under the other sparsity.execution is
  restored in that mode's shapes and converted (blocked.convert_state)."""
  try:
    return ckpt.restore_latest(exp.abstract_state)
  except checkpointing.CheckpointMismatchError as mismatch:
    config = exp.config.copy_and_resolve_references()
    current = config.sparsity.get('execution', 'masked')
    config.sparsity.execution = 'masked' if current == 'block_sparse' else 'block_sparse'
    try:
      other = build_experiment(config)
      state, step = ckpt.restore_latest(other.abstract_state)
    except (ValueError, checkpointing.CheckpointMismatchError):
      raise mismatch from None
  state = blocked.convert_state(state, other.rule, exp.rule)
  return jax.device_put(state, exp.state_shardings()), step


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

  def params_finite(self):
    """state -> whether every weight is finite, jitted: checked before each save."""
    # Not isfinite(global_norm): the norm overflows float32 for large but finite weights.
    finite = jax.jit(
      lambda params: jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
    )
    return lambda state: bool(finite(state.params))

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
  """Trains (or, with mode='eval', evaluates the latest checkpoint); returns the summary.

  Rerunning a finished run leaves its outputs as they are (or rebuilds a missing summary.json
  from its last checkpoint and metrics row) and says so. A full disk, a read-only workdir or a
  workdir that is a file raise errors.WorkdirError naming the path.
  """
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; known: {", ".join(MODES)}')
  t_start = time.time()
  use_compilation_cache()
  launch.initialize(config)  # before anything touches a device (the guard asks process_count)
  if jax.default_backend() == 'cpu':
    hostmem.keep_freed_memory()
  try:
    with preemption.PreemptionGuard() as guard:
      return run(config, workdir, mode, guard, t_start)
  except errors.UserError:
    raise
  except Exception as e:
    problem = errors.workdir_error(e, workdir)
    if problem is None:
      raise
    raise problem from e


def run(
  config: ml_collections.ConfigDict, workdir: str, mode: str, guard, t_start: float
) -> dict[str, Any]:
  """train_and_evaluate's body, inside the preemption guard."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.WorkdirError(f'--workdir={workdir} is a file, not a folder: pass a folder path')
  os.makedirs(workdir, exist_ok=True)
  saved_total_steps = check_workdir_config(config, workdir)
  exp = build_experiment(config)
  if mode == 'train':
    metrics_lib.write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json()))

  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint.keep)
  try:
    restored = restore(exp, ckpt)
    if mode == 'eval':
      return evaluate_checkpoint(exp, workdir, restored, ckpt)
    if restored is None:
      check_fresh_start(workdir)
      state, start_step = exp.new_state(), 0
    else:
      state, start_step = restored
    if start_step > config.total_steps:
      raise RunStateError(
        f'{ckpt.directory} holds step {start_step}, past total_steps={config.total_steps}: '
        'raise --config.total_steps or pass a new --workdir'
      )
    if start_step == config.total_steps:
      return finished_summary(exp, workdir, state, t_start)
    if start_step:
      announce(f'resumed from step {start_step} of {config.total_steps} ({ckpt.directory})')
      if saved_total_steps is not None:
        announce(
          f'total_steps changed from {saved_total_steps} to {config.total_steps}: the learning-rate '
          'and sparsity schedules follow the new length from here'
        )
    writer = metrics_lib.MetricWriter(workdir, start_step)
    try:
      state, final = train_loop(exp, state, start_step, ckpt, writer, guard)
    finally:
      writer.close()
  finally:
    ckpt.wait()
    ckpt.close()
  return write_summary(exp, workdir, state, final, start_step, t_start)


def announce(message: str) -> None:
  """A line for the console (process 0), also logged."""
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)


def check_fresh_start(workdir: str) -> None:
  """Refuses to start at step 0 in a workdir whose checkpoints were all set aside."""
  held = [
    os.path.join(workdir, d)
    for d in checkpointing.SET_ASIDE
    if os.path.isdir(os.path.join(workdir, d)) and os.listdir(os.path.join(workdir, d))
  ]
  if held or os.path.exists(os.path.join(workdir, 'summary.json')):
    evidence = ', '.join(held) or os.path.join(workdir, 'summary.json')
    raise RunStateError(
      f'{workdir} has no checkpoint left but held a run ({evidence}); refusing to start over '
      f'from step 0 on top of it. To start over, move {workdir} away or pass a new --workdir.'
    )


def evaluate_checkpoint(exp: Experiment, workdir: str, restored, ckpt) -> dict[str, Any]:
  """--mode=eval: evaluates the latest checkpoint, prints the result and writes eval.json."""
  if restored is None:
    raise FileNotFoundError(f'--mode=eval needs a checkpoint; {ckpt.directory} has none')
  state, step = restored
  result = {'step': step, **evaluate(exp.eval_step(), state, exp.dataset, exp.mesh)}
  announce(f'eval at step {step}: {metrics_lib.format_scalars(result, "eval/")}')
  if not math.isfinite(result['eval/loss']):
    raise NonFiniteLossError(
      f'eval/loss={result["eval/loss"]} at step {step}: checkpoint {ckpt.directory}/{step} '
      'holds a diverged state'
    )
  metrics_lib.write_json(os.path.join(workdir, 'eval.json'), result)
  return result


def finished_summary(exp: Experiment, workdir: str, state, t_start: float) -> dict[str, Any]:
  """A rerun of a finished run: keeps summary.json, or rebuilds it whole if it is missing."""
  path = os.path.join(workdir, 'summary.json')
  step = exp.config.total_steps
  if os.path.exists(path):
    announce(f'run in {workdir} already finished at step {step}; its outputs are left as they are')
    with open(path) as f:
      return json.load(f)
  rows = [r for r in metrics_lib.read_rows(workdir) if r['step'] == step]
  if not rows:
    raise RunStateError(
      f'{workdir} has the final checkpoint (step {step}) but neither summary.json nor the '
      'final row of metrics.jsonl; evaluate it with --mode=eval'
    )
  announce(f'run in {workdir} finished at step {step} without summary.json; rebuilt it')
  final = {k: v for k, v in rows[-1].items() if k != 'step'}
  return write_summary(exp, workdir, state, final, step, t_start)


def write_summary(exp: Experiment, workdir: str, state, final, start_step: int, t_start: float):
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


def train_loop(exp: Experiment, state, start_step: int, ckpt, writer, guard):
  """Runs steps start_step+1 .. total_steps; returns (final state, last logged metrics)."""
  config, dataset = exp.config, exp.dataset
  total = config.total_steps
  step_fn, eval_step, sparsity_metrics = exp.train_step(), exp.eval_step(), exp.sparsity_metrics()
  params_finite = exp.params_finite()
  health = Health(uniform_loss(dataset.meta), ckpt)
  unit = 'tokens' if dataset.kind == 'text' else 'examples'
  final: dict[str, Any] = {}
  batches = dataset.train_iterator(start_step)
  t_last, s_last = time.perf_counter(), start_step
  with metrics_lib.Progress(total, start_step, unit, enabled=config.progress) as progress:
    for step in range(start_step + 1, total + 1):
      state, step_metrics = step_fn(state, sharding.global_batch(exp.mesh, next(batches)))
      if guard.requested or ckpt.reached_preemption(step):
        health.check(jax.device_get(step_metrics), step, params_finite(state))
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
          if config.analysis.spectral:  # host-side eigensolves: eval steps only
            row.update(spectral.state_metrics(masked_view(state, exp)))
      # Before anything is written: a diverged step neither logs nor saves.
      health.check(row, step, params_finite(state) if is_ckpt else True)
      if is_log:
        writer.write(step, row)
        final.update(row)
        progress.update(step, row)
        t_last, s_last = time.perf_counter(), step  # eval time is not step time
      if is_ckpt:
        ckpt.save(step, state)
  return state, final


def every(step: int, period: int) -> bool:
  return bool(period) and step % period == 0


def uniform_loss(meta: dict[str, Any]) -> float:
  """Cross-entropy of a uniform guess over the outputs: the scale of an untrained model's loss."""
  return math.log(meta.get('vocab_size') or meta['num_classes'])


class Health:
  """Checks each logged or saved step before it is written; confirms healthy checkpoints."""

  def __init__(self, uniform: float, ckpt):
    self.uniform = uniform
    self.ckpt = ckpt
    self.recent: list[float] = []

  def limit(self) -> float:
    typical = statistics.median(self.recent) if self.recent else 0.0
    return DIVERGENCE_FACTOR * max(self.uniform, typical)

  def check(self, row: dict[str, Any], step: int, params_finite: bool) -> None:
    """Raises NonFiniteLossError on NaN/Inf loss, gradient or weights, or an exploding loss.

    train/loss at `step` is the loss of the state of step - 1 (and eval/loss that of `step`),
    so a passing check confirms the checkpoints up to there.
    """
    loss, grad_norm = float(row['train/loss']), float(row['train/grad_norm'])
    eval_loss = float(row.get('eval/loss', 0.0))
    limit = self.limit()
    problem = ''
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      problem = f'train/loss={loss}, train/grad_norm={grad_norm}'
    elif not params_finite:
      problem = 'the weights hold NaN/Inf'
    elif loss > limit or not eval_loss <= limit:
      losses = {k: row[k] for k in ('train/loss', 'eval/loss') if k in row}
      problem = (
        ', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())
        + f' above the divergence limit {limit:.4g} ({DIVERGENCE_FACTOR:g} x max(uniform-guess '
        f'loss {self.uniform:.4g}, median of the last {DIVERGENCE_WINDOW} checked losses))'
      )
    if not problem:
      self.recent = [*self.recent, loss][-DIVERGENCE_WINDOW:]
      self.ckpt.confirm(step if 'eval/loss' in row else step - 1)
      return
    moved = self.ckpt.set_aside_unconfirmed()
    kept = self.ckpt.steps()
    raise NonFiniteLossError(
      f'step {step}: {problem}; lower optim.lr or set optim.clip_norm. '
      f'Checkpoints kept: {kept or "none"}'
      + (f'; unconfirmed ones moved to {", ".join(moved)}' if moved else '')
      + '.'
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
  return flops.training_flops_per_example(exp.rule, exp.flop_report, densities, step)


def masked_view(state: TrainState, exp: Experiment) -> TrainState:
  """The state with dense-shaped params and masks (block-sparse execution unpacked)."""
  if not isinstance(exp.rule, blocked.BlockRule):
    return state
  sstate, dense_params = exp.rule.unpack(state.sparsity, state.params)
  return state.replace(params=dense_params, sparsity=sstate)


def run_facts(state: TrainState, exp: Experiment) -> dict[str, Any]:
  """Parameter counts, norms and FLOPs of the final state for summary.json."""
  state = masked_view(state, exp)  # counted as the masked model it executes
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
  """The Sparse-IFT member against its dense original (docs/methods.md section 1's two FLOP figures)."""
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
