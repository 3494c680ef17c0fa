"""`sift.match_flops`: the mask sparsity at which a Sparse-IFT model costs the dense model's FLOPs.

Sparse Wide rounds widths and widens layers that stay dense (stem, classifier, embeddings, and
attention scores grow with d_model), so the nominal s leaves the whole model off the dense
budget. The original code bisects the transformed layers' sparsity until whole-model forward
FLOPs match within 0.1%. With the `uniform` distribution those FLOPs are affine in the common
density d of the sparse kernels, F(d) = F_fixed + d * F_sparse, so the root is solved exactly
instead; the per-layer counts the masks then realise (round((1 - s) n), or K per block-column of
a balanced plan) are checked to stay within the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from sift_jax import flops, models
from sift_jax.sift import settings as settings_lib
from sift_jax.sparse_layers import sparse_kernel_paths

TOLERANCE = 1e-3  # relative, on whole-model forward FLOPs


class NoMatchingLevel(ValueError):
  """The layers that stay dense already cost more than the target (wide GPT at high s)."""


def matched_level(
  report: flops.FlopReport,
  sparse_paths: Sequence[tuple[str, ...]],
  sizes: Mapping[tuple[str, ...], int],
  target_flops: float,
  densities_at: Callable[[float], Mapping[str, float]] | None = None,
) -> float:
  """The uniform sparsity of `sparse_paths` at which `report`'s model costs `target_flops`.

  `report` is the model's FLOP report (its densities are ignored), `sizes` the element count of
  each sparse kernel. The solution is checked at the densities the masks realise:
  `densities_at(level)` ({layer name: density}, a balanced or blocked plan's), by default the
  exact counts round((1 - level) n) / n. Raises ValueError when no sparsity in [0, 1) reaches the
  target.
  """
  names = ['/'.join(p) for p in sparse_paths]
  missing = sorted(set(names) - set(report.per_layer))
  if missing:
    raise ValueError(
      f'sparse kernels {missing} have no FLOP record; known: {sorted(report.per_layer)}'
    )
  sparse = sum(report.per_layer[n].dense_flops for n in names)
  fixed = report.forward_dense - sparse
  if sparse <= 0 or not fixed < target_flops <= fixed + sparse:
    raise NoMatchingLevel(
      f'no sparsity in [0, 1) matches {target_flops:.6g} forward FLOPs: the dense layers cost '
      f'{fixed:.6g} and the sparse kernels {sparse:.6g} when dense'
    )
  density = (target_flops - fixed) / sparse
  if densities_at is None:
    realised = {
      n: round(density * sizes[p]) / sizes[p] for n, p in zip(names, sparse_paths, strict=True)
    }
  else:
    realised = densities_at(1.0 - density)
  exact = fixed + sum(report.per_layer[n].dense_flops * realised.get(n, 1.0) for n in names)
  if abs(exact - target_flops) > TOLERANCE * target_flops:
    raise ValueError(
      f'the exact mask counts at density {density:.6g} give {exact:.6g} FLOPs, more than '
      f'{TOLERANCE:.1%} off the target {target_flops:.6g}: the sparse kernels are too small or '
      'their blocks too coarse'
    )
  return 1.0 - density


def dense_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment without the Sparse-IFT transformation (the FLOP budget's reference)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.sift.name = 'dense'
  c.sift.match_flops = False
  return c


def solve_level(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> float:
  """The mask sparsity of the model's sparse kernels that matches the dense model's forward FLOPs.

  Everything is computed from shapes (jax.eval_shape); nothing the size of the model is allocated.
  """
  settings_lib.from_config(config)
  model = models.build_model(config, meta)
  variables = models.abstract_variables(model, config, meta)
  paths = sparse_kernel_paths(variables)
  params = variables['params']
  sizes = {}
  for path in paths:
    leaf = params
    for key in path:
      leaf = leaf[key]
    sizes[path] = int(leaf.size)
  base = dense_config(config)
  target = flops.count_forward_flops(models.build_model(base, meta), base, meta).forward_dense
  report = flops.count_forward_flops(model, config, meta)
  return matched_level(
    report, paths, sizes, target, lambda level: layer_densities(config, variables, level)
  )


def layer_densities(
  config: ml_collections.ConfigDict, variables: Mapping[str, Any], level: float
) -> dict[str, float]:
  """{'hidden_0/kernel': density} of the masks the rule plans at `level` (flops.plan_layers)."""
  return {layer.name: layer.density for layer in flops.plan_layers(config, variables, level)}


def mask_level(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> float:
  """The sparsity the rule holds the sparse kernels at: solved with match_flops, else s."""
  if settings_lib.from_config(config).match_flops:
    return solve_level(config, meta)
  return float(config.sparsity.level)
