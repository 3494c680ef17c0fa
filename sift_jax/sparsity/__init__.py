"""The sparse training engine: masks beside any params pytree, updated inside the jitted step.

    rule = make_rule(config, params_shapes, sparse_paths)   # sparse_paths None: SPEC default filter
    rule = build_rule('rigl', params_shapes, level=0.9, total_steps=1000)   # or keyword options
    sstate, params = rule.init(params, rng)                 # exact-count masks, masked params
    fwd = rule.forward_params(sstate, params)               # what the forward pass uses
    with rule.execute(sstate):                              # block-sparse layers, GSE's capture
      g_fwd = jax.grad(loss_fn)(fwd, batch)                 # grads w.r.t. fwd
    sstate, params, opt_state = sparse_apply(rule, tx, sstate, params, opt_state, g_fwd, step)

`sparse_apply` (execution.py) is the optimizer step and the mask update the trainer runs:
`rule.param_grads`, `tx.update`, `rule.restrict_updates`, `optax.apply_updates`,
`rule.update_masks`. Or in one call, around any optax optimizer (`wrapper.py`):

    tx = wrap_optax(optax.adam(1e-3), params, level=0.9, rule='rigl', total_steps=1000)
    fwd = masked_params(opt_state, params)

Rules are registered by name in `registry.RULES` (dense, static, set, rigl, topkast, gse, gmp);
distributions in `registry.DISTRIBUTIONS` (uniform, erk, er); executions (masked, block_sparse)
in `execution.EXECUTIONS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from sift_jax.registry import DISTRIBUTIONS, EXECUTIONS, RULES
from sift_jax.sparsity import execution, rules
from sift_jax.sparsity.execution import convert_state, sparse_apply
from sift_jax.sparsity.export import export_sparse, load_sparse
from sift_jax.sparsity.plan import check_level, describe, make_plan, path_of
from sift_jax.sparsity.rules import Rule
from sift_jax.sparsity.wrapper import masked_params, wrap_optax

__all__ = [
  'Rule',
  'build_rule',
  'convert_state',
  'execution',
  'export_sparse',
  'layer_densities',
  'layer_densities_from_metrics',
  'load_sparse',
  'make_rule',
  'masked_params',
  'masks_of',
  'rules',
  'sparse_apply',
  'with_execution',
  'wrap_optax',
]

_DENSITY_PREFIX = 'sparsity/density/'
# The plan's options (which weights, how many, in what blocks), as opposed to the rule's own.
PLAN_OPTIONS = {
  'distribution': 'uniform',
  'overrides': '',
  'power_scale': 1.0,
  'block_shape': (1, 1),
  'balanced': False,
}


def make_rule(config: ml_collections.ConfigDict, params_shapes: Any, sparse_paths=None) -> Rule:
  """The update rule `config.sparsity.rule` of a run config (`build_rule` with its options).

  Raises ValueError on bad config values, naming the value and what is allowed.
  """
  s = config.sparsity
  if config.sift.name != 'dense' and s.distribution != 'uniform':
    raise ValueError(
      f'sift.name={config.sift.name!r} needs sparsity.distribution=uniform (iso-FLOP), '
      f'got {s.distribution!r}'
    )
  cls = RULES.get(s.rule)
  names = set(PLAN_OPTIONS) | set(cls.options()) - {'total_steps'}
  return build_rule(
    s.rule,
    params_shapes,
    sparse_paths,
    level=float(s.level),
    total_steps=int(config.total_steps),
    **{k: s[k] for k in names if k in s},
  )


def build_rule(
  rule: str,
  params_shapes: Any,
  sparse_paths: Sequence[Sequence[str]] | None = None,
  *,
  level: float,
  total_steps: int,
  **options: Any,
) -> Rule:
  """The registered rule `rule` over a params tree of shapes (or arrays) at sparsity `level`.

  `options` are the plan's (`PLAN_OPTIONS`: distribution, overrides, power_scale, block_shape,
  balanced) and the rule's keyword options (`RULES.get(rule).options()`: update_every_steps,
  drop_fraction, backward_level, execution, ...), named and defaulted as the config's `sparsity`
  keys. `sparse_paths` are the kernels the model declares sparse (tuples of keys, relative to
  the params tree); None applies the default filter of docs/methods.md section 2.
  execution='block_sparse' stores the sparse kernels as blocks (sift_jax.sparsity.execution)
  and implies balanced masks. Raises ValueError naming a bad value and what is allowed.
  """
  cls = RULES.get(rule)
  unknown = sorted(set(options) - set(PLAN_OPTIONS) - set(cls.options()))
  if unknown:
    allowed = sorted(set(PLAN_OPTIONS) | set(cls.options()) - {'total_steps'})
    raise ValueError(f'unknown option(s) {unknown} of rule {rule!r}; allowed: {", ".join(allowed)}')
  plan = {**PLAN_OPTIONS, **{k: v for k, v in options.items() if k in PLAN_OPTIONS}}
  rule_options = {k: v for k, v in options.items() if k not in PLAN_OPTIONS}
  DISTRIBUTIONS.get(plan['distribution'])
  check_level(float(level), 'sparsity.level')
  backward_level = float(rule_options.get('backward_level', 0.0))
  check_level(backward_level, 'sparsity.backward_level')
  if backward_level > level:
    raise ValueError(f'sparsity.backward_level={backward_level} is above sparsity.level={level}')
  execution_name = rule_options.get('execution', 'masked')
  if execution_name not in EXECUTIONS:
    raise ValueError(
      f'sparsity.execution={execution_name!r}; allowed: {", ".join(EXECUTIONS.names())}'
    )
  if not cls.has_masks and level > 0:
    raise ValueError(f'sparsity.rule={rule} with sparsity.level={level}; pick a sparse rule')
  layers = []
  if cls.has_masks:
    layers = make_plan(
      params_shapes,
      float(level),
      plan['distribution'],
      sparse_paths,
      plan['overrides'],
      float(plan['power_scale']),
      tuple(int(b) for b in plan['block_shape']),
      balanced=bool(plan['balanced']) or execution_name == 'block_sparse',
    )
  if layers:
    line = describe(layers)
    # A layer floored at one block or off its target density changes the model's cost: say so.
    off = any(layer.floored or layer.drifts for layer in layers)
    (logging.warning if off else logging.info)(line)
  made = cls(params_shapes, layers, total_steps=total_steps, **rule_options)
  made.execution  # noqa: B018 (built now: a plan it cannot run raises here, naming the layer)
  made.build_args = (
    rule,
    params_shapes,
    sparse_paths,
    {'level': level, 'total_steps': total_steps, **options},
  )
  if made.changes_masks and made.layers and not made.schedule.steps():
    # Not an error: the run still holds its exact sparsity, as a static one (GMP, which would
    # end dense, raises instead).
    warnings.warn(
      f'sparsity.rule={rule} never updates its masks: {made.window()} are none, so it trains '
      'as static. Lower the update interval or sparsity.start_step, or lengthen the window.',
      stacklevel=3,
    )
  return made


def with_execution(rule: Rule, execution_name: str) -> Rule:
  """The same rule (name, options, params) under another execution: a state of either converts
  to the other (`convert_state`). Rebuilt, since block_sparse plans balanced masks."""
  if rule.build_args is None:
    raise ValueError('with_execution rebuilds a rule made by build_rule or make_rule')
  name, params_shapes, sparse_paths, options = rule.build_args
  return build_rule(name, params_shapes, sparse_paths, **{**options, 'execution': execution_name})


def masks_of(sstate: rules.MaskState) -> Any:
  """Bool masks, params-shaped, None for dense leaves (Top-KAST: the forward set A)."""
  return sstate.masks


def layer_densities(masks: Any) -> dict[tuple[str, ...], float]:
  """Path tuple -> density of each masked leaf."""
  flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  return {path_of(kp): float(m.sum()) / m.size for kp, m in flat}


def layer_densities_from_metrics(row: dict[str, Any]) -> dict[tuple[str, ...], float]:
  """Path tuple -> density from the `sparsity/density/<path>` entries of a metrics row."""
  return {
    tuple(k[len(_DENSITY_PREFIX) :].split('/')): float(v)
    for k, v in row.items()
    if k.startswith(_DENSITY_PREFIX)
  }
