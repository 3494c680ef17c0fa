"""The sparse training engine: masks beside any params pytree, updated inside the jitted step.

    rule = make_rule(config, params_shapes, sparse_paths)   # sparse_paths None: SPEC default filter
    sstate, params = rule.init(params, rng)                 # exact-count masks, masked params
    fwd = rule.forward_params(sstate, params)               # what the forward pass uses
    grads = rule.param_grads(sstate, params, g_fwd)         # g_fwd: grads w.r.t. fwd
    updates = rule.mask_updates(sstate, optimizer_updates)
    sstate, params, opt_state = rule.update(sstate, params, g_fwd, opt_state, step, None, aux)

Or in one call, around any optax optimizer (`wrapper.py`):

    tx = wrap_optax(optax.adam(1e-3), params, level=0.9, rule='rigl', total_steps=1000)
    fwd = masked_params(opt_state, params)

Rules are registered by name in `registry.RULES` (dense, static, set, rigl, topkast, gse, gmp);
distributions in `registry.DISTRIBUTIONS` (uniform, erk).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import ml_collections
from absl import logging

from sift_jax.registry import DISTRIBUTIONS, RULES
from sift_jax.sparsity import blocked, rules
from sift_jax.sparsity.export import export_sparse, load_sparse
from sift_jax.sparsity.plan import check_level, describe, make_plan, path_of
from sift_jax.sparsity.rules import Rule
from sift_jax.sparsity.wrapper import masked_params, wrap_optax

__all__ = [
  'Rule',
  'export_sparse',
  'layer_densities',
  'layer_densities_from_metrics',
  'load_sparse',
  'make_rule',
  'masked_params',
  'masks_of',
  'rules',
  'wrap_optax',
]

_DENSITY_PREFIX = 'sparsity/density/'
EXECUTIONS = ('masked', 'block_sparse')


def make_rule(config: ml_collections.ConfigDict, params_shapes: Any, sparse_paths=None) -> Rule:
  """The update rule `config.sparsity.rule` over a params tree of shapes (or arrays).

  With sparsity.execution=block_sparse the rule comes wrapped in `blocked.BlockRule`, whose
  state holds the sparse kernels as blocks (see sift_jax.sparsity.blocked).

  `sparse_paths` are the kernels the model declares sparse (tuples of keys, relative to the
  params tree); None applies the default filter of docs/methods.md section 2. Raises ValueError on bad
  config values, naming the value and what is allowed.
  """
  s = config.sparsity
  cls = RULES.get(s.rule)
  DISTRIBUTIONS.get(s.distribution)
  check_level(float(s.level), 'sparsity.level')
  check_level(float(s.backward_level), 'sparsity.backward_level')
  if s.backward_level > s.level:
    raise ValueError(
      f'sparsity.backward_level={s.backward_level} is above sparsity.level={s.level}'
    )
  execution = s.get('execution', 'masked')
  if execution not in EXECUTIONS:
    raise ValueError(f'sparsity.execution={execution!r}; allowed: {", ".join(EXECUTIONS)}')
  if s.rule == 'dense' and s.level > 0:
    raise ValueError(f'sparsity.rule=dense with sparsity.level={s.level}; pick a sparse rule')
  if config.sift.name != 'dense' and s.distribution != 'uniform':
    raise ValueError(
      f'sift.name={config.sift.name!r} needs sparsity.distribution=uniform (iso-FLOP), '
      f'got {s.distribution!r}'
    )
  layers = []
  if s.rule != 'dense':
    layers = make_plan(
      params_shapes,
      float(s.level),
      s.distribution,
      sparse_paths,
      s.overrides,
      float(s.power_scale),
      tuple(int(b) for b in s.block_shape),
      balanced=bool(s.get('balanced', False)) or execution == 'block_sparse',
    )
  if layers:
    line = describe(layers)
    (logging.warning if any(layer.floored for layer in layers) else logging.info)(line)
  rule = cls(config, params_shapes, layers)
  if rule.updates_masks and rule.layers and not rule.schedule.steps():
    # Not an error: the run still holds its exact sparsity, as a static one (GMP, which would
    # end dense, raises instead).
    warnings.warn(
      f'sparsity.rule={s.rule} never updates its masks: {rule.window()} are none, so it trains '
      'as static. Lower the update interval or sparsity.start_step, or lengthen the window.',
      stacklevel=2,
    )
  return blocked.BlockRule(rule) if execution == 'block_sparse' else rule


def masks_of(sstate: dict[str, Any]) -> Any:
  """Bool masks, params-shaped, None for dense leaves (Top-KAST: the forward set A)."""
  return sstate['masks']


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
