"""What a run builds from its config before the first step: `build_experiment(config)`.

The mesh, the data, the model, the optimizer, the sparsity rule, the initial and abstract state
and the FLOP count; the facts summary.json reports of a state; and restoring a checkpoint into an
experiment (converting one saved under the other sparsity.execution). With the dataset's meta
(`data.dataset_meta(config)`) it builds everything but the dataset, enough to lower and compile
the steps from abstract inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sift_jax import (
  checkpointing,
  data,
  flops,
  models,
  optim,
  sharding,
  sparsity,
  steps,
  validation,
)
from sift_jax.models.layers import sparse_kernel_paths
from sift_jax.sift import report as sift_report
from sift_jax.state import TrainState


def validate_config(c: ml_collections.ConfigDict, meta: Mapping[str, Any] | None = None) -> None:
  """Checks the step counts and grad_accum_steps, then validation.validate's names (first, before
  any data loads), ranges and block programs; each subsystem checks the rest of its group."""
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
  validation.validate(c, meta)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run builds from its config before the first step (benchmarks reuse it)."""

  config: ml_collections.ConfigDict
  mesh: Any
  dataset: Any  # data.Dataset; None when built from the meta alone
  meta: Mapping[str, Any]  # what the model is sized by (data/__init__.py's dataset_meta)
  task: steps.Task
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
    step = steps.make_train_step(
      self.model, self.tx, self.schedule, self.rule, self.task, self.config
    )
    # Pinned output shardings: the state keeps its fsdp layout step after step (no recompiles).
    out = (self.state_shardings(), sharding.replicated(self.mesh))
    return jax.jit(step, donate_argnums=(0,), out_shardings=out)

  def eval_step(self):
    return jax.jit(steps.make_eval_step(self.model, self.rule, self.task))

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


def build_experiment(
  config: ml_collections.ConfigDict, meta: Mapping[str, Any] | None = None
) -> Experiment:
  """Checks the config and builds mesh, data, model, optimizer, sparsity rule and FLOP count.

  Given the dataset's `meta` (data.dataset_meta(config)), it loads no data: the Experiment's
  dataset is None, and everything else, the steps included, is as a run builds it.
  """
  validate_config(config, meta)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval.batch_size or config.batch_size, mesh, 'eval.batch_size')
  dataset = None
  if meta is None:
    dataset = data.build_dataset(
      config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    meta = dataset.meta
  model = models.build_model(config, meta)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  x_spec = models.example_input(config, meta, batch_size=1)
  abstract_vars = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), x_spec
  )
  sift_flops = None
  rule_config = config
  if config.sift.name != 'dense':
    # The member is sized by the nominal s; with match_flops its masks hold the solved level.
    sift_flops = sift_report.sift_flops(config, meta)
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

  abstract = with_shardings(
    jax.eval_shape(init_state, jax.random.PRNGKey(config.seed)), mesh, config
  )
  return Experiment(
    config=config,
    mesh=mesh,
    dataset=dataset,
    meta=meta,
    task=steps.task_of(meta),
    model=model,
    tx=tx,
    schedule=schedule,
    rule=rule,
    init_state=init_state,
    abstract_state=abstract,
    flop_report=flops.count_forward_flops(model, config, meta),
    sift_flops=sift_flops,
  )


def with_shardings(abstract: Any, mesh: Any, config: ml_collections.ConfigDict) -> Any:
  """An abstract state's ShapeDtypeStructs carrying the run's shardings."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    sharding.state_shardings(mesh, abstract, config.mesh.fsdp_min_size),
  )


def restore(exp: Experiment, ckpt: checkpointing.Checkpointer) -> tuple[Any, int] | None:
  """The latest checkpoint as (state, step); one written under another sparsity.execution is
  restored in that execution's layout of the same rule and converted (sparsity.convert_state)."""
  try:
    return ckpt.restore_latest(exp.abstract_state)
  except checkpointing.CheckpointMismatchError as mismatch:
    current = exp.rule.execution
    for name in sparsity.EXECUTIONS.names():
      if name == current.name:
        continue
      try:
        other = sparsity.with_execution(exp.rule, name).execution
        convert = functools.partial(
          sparsity.convert_state, source=current, target=other, check=False
        )
        abstract = with_shardings(jax.eval_shape(convert, exp.abstract_state), exp.mesh, exp.config)
        state, step = ckpt.restore_latest(abstract)
      except (ValueError, checkpointing.CheckpointMismatchError):
        continue
      state = sparsity.convert_state(state, other, current)
      return jax.device_put(state, exp.state_shardings()), step
    raise mismatch from None


def throughput(exp: Experiment, step_time_s: float) -> dict[str, float]:
  out = {
    'train/step_time_s': step_time_s,
    'train/examples_per_s': exp.config.batch_size / step_time_s,
  }
  if exp.task == steps.TOKENS:
    out['train/tokens_per_s'] = out['train/examples_per_s'] * exp.meta['seq_len']
  return out


def train_flops(exp: Experiment, densities, step: int) -> float:
  """Training FLOPs per example at step `step` and the given per-layer densities."""
  return flops.training_flops_per_example(exp.rule, exp.flop_report, densities, step)


def masked_view(state: TrainState, exp: Experiment) -> TrainState:
  """The state with dense-shaped params and masks (block-sparse execution unpacked)."""
  sstate, dense_params = exp.rule.execution.to_masked(state.sparsity, state.params)
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
    **sparsity.plan.drift_facts(exp.rule.layers),  # layers whose density misses 1 - s
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
