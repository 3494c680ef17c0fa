"""Analytical forward FLOPs, per layer and per model, from shapes only.

Convention (docs/methods.md section 1, docs/design.md): 1 MAC = 2 FLOPs; only dots and convolutions count;
attention scores and context count the full T x T; a masked weight counts at its layer's density.
The forward pass is traced abstractly (jax.eval_shape) with `nn.intercept_methods` recording each
Dense / Conv / Embed.attend call and each module that reports its own matmuls through a
`forward_flops(*args, **kwargs) -> {name: flops}` method (the attention cores). Nothing the size
of the model is allocated. Counts are per example: per image, or per sequence for text.
`python -m sift_jax.model_report --config=...` prints the table of a config's model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from sift_jax import models


@dataclasses.dataclass(frozen=True)
class LayerFlops:
  """Forward FLOPs per example of one weight (or one weight-free matmul, density 1)."""

  dense_flops: float
  flops: float
  density: float


@dataclasses.dataclass
class FlopReport:
  per_layer: dict[str, LayerFlops]  # 'Block_0/query/kernel' -> LayerFlops
  forward: float  # per example, masked weights at their density
  forward_dense: float  # per example, every weight dense

  def at_densities(self, densities: Mapping[tuple[str, ...], float]) -> float:
    """Forward FLOPs per example with the given kernel densities (others as in this report)."""
    by_name = {'/'.join(path): float(d) for path, d in densities.items()}
    unknown = sorted(set(by_name) - set(self.per_layer))
    if unknown:
      raise ValueError(f'densities for unknown layers {unknown}; known: {sorted(self.per_layer)}')
    return sum(
      layer.dense_flops * by_name[name] if name in by_name else layer.flops
      for name, layer in self.per_layer.items()
    )


def _record_call(records: dict[str, float], next_fun, args, kwargs, context) -> Any:
  """An nn.intercept_methods interceptor adding the dense FLOPs of one call to `records`."""
  module = context.module
  out = next_fun(*args, **kwargs)
  path = module.path
  name = context.method_name
  entries: dict[tuple[str, ...], float] = {}
  if isinstance(module, nn.Dense) and name == '__call__':
    x = args[0]
    entries[(*path, 'kernel')] = 2.0 * math.prod(x.shape[:-1]) * x.shape[-1] * module.features
  elif isinstance(module, nn.Conv) and name == '__call__':
    kernel = module.get_variable('params', 'kernel')  # (kh, kw, C_in / groups, C_out)
    entries[(*path, 'kernel')] = 2.0 * math.prod(out.shape[:-1]) * math.prod(kernel.shape)
  elif isinstance(module, nn.Embed) and name == 'attend':
    q = args[0]
    entries[(*path, 'embedding')] = 2.0 * math.prod(q.shape) * module.num_embeddings
  elif hasattr(module, 'forward_flops') and name == '__call__':
    entries.update({(*path, k): v for k, v in module.forward_flops(*args, **kwargs).items()})
  for key, flops in entries.items():
    # A re-traced call (a lifted transform tracing twice) must not count twice.
    records['/'.join(key)] = flops
  return out


def count_forward_flops(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  meta: Mapping[str, Any],
  densities: Mapping[tuple[str, ...], float] | None = None,
) -> FlopReport:
  """Forward FLOPs per example of `model`; `densities` maps kernel paths (as in
  `models.sparse_kernel_paths`) to their mask density; unlisted weights are dense."""
  variables = models.abstract_variables(model, config, meta)
  variables = {k: v for k, v in variables.items() if k != 'sparse'}
  x = models.example_input(config, meta, batch_size=1)
  records: dict[str, float] = {}

  def forward(variables: dict[str, Any], x: jax.Array) -> jax.Array:
    intercept = lambda *a: _record_call(records, *a)
    with nn.intercept_methods(intercept):
      return model.apply(variables, x, train=False)

  jax.eval_shape(forward, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))

  by_name = {'/'.join(path): float(d) for path, d in (densities or {}).items()}
  unknown = sorted(set(by_name) - set(records))
  if unknown:
    raise ValueError(f'densities for unknown layers {unknown}; known: {sorted(records)}')
  bad = {k: d for k, d in by_name.items() if not 0.0 <= d <= 1.0}
  if bad:
    raise ValueError(f'densities must be in [0, 1], got {bad}')
  per_layer = {
    name: LayerFlops(flops, flops * by_name.get(name, 1.0), by_name.get(name, 1.0))
    for name, flops in records.items()
  }
  return FlopReport(
    per_layer=per_layer,
    forward=sum(layer.flops for layer in per_layer.values()),
    forward_dense=sum(layer.dense_flops for layer in per_layer.values()),
  )


def training_flops_per_example(
  rule: Any, report: FlopReport, densities: Mapping[tuple[str, ...], float], step: int
) -> float:
  """Training FLOPs per example at `step` (docs/methods.md section 1), as the sparsity rule accounts them.

  Each rule states its own accounting (`Rule.training_flops`, sift_jax.sparsity.rules): dense
  3 f_D; static, SET, GSE and GMP 3 f_S with f_S the forward FLOPs at the masks' current
  density; RigL (3 f_S dT + 2 f_S + f_D) / (dT + 1) while it updates masks, then 3 f_S; Top-KAST
  2 f_A + f_B (forward and input gradients on set A, weight gradients on set B). `densities`
  maps sparse kernel paths to their forward density.
  """
  return rule.training_flops(report, densities, step)


def uniform_densities(
  model: nn.Module, config: ml_collections.ConfigDict, meta: Mapping[str, Any], level: float
) -> dict[tuple[str, ...], float]:
  """Every declared sparse kernel at density 1 - level (the `uniform` distribution)."""
  paths = models.sparse_kernel_paths(models.abstract_variables(model, config, meta))
  return dict.fromkeys(paths, 1.0 - level)


def plan_layers(
  config: ml_collections.ConfigDict, variables: Mapping[str, Any], level: float
) -> list[Any]:
  """The sparse layers (sparsity.plan.Layer) the run's rule holds at sparsity `level`, planned as
  make_rule plans them: distribution, overrides, blocks, and balanced K per block-column (always
  under block-sparse execution), so their active counts are the masks' own. `variables` are the
  model's (abstract) variables; a dense rule has none."""
  from sift_jax.sparsity import plan  # the sparsity package sits above this module

  s = config.sparsity
  if s.rule == 'dense':
    return []
  return plan.make_plan(
    variables['params'],
    float(level),
    s.distribution,
    models.sparse_kernel_paths(variables),
    s.overrides,
    float(s.power_scale),
    tuple(int(b) for b in s.block_shape),
    balanced=bool(s.get('balanced', False)) or s.get('execution', 'masked') == 'block_sparse',
  )


def plan_densities(
  model: nn.Module, config: ml_collections.ConfigDict, meta: Mapping[str, Any], level: float
) -> dict[tuple[str, ...], float]:
  """Each sparse kernel's density as its mask will have it at `level` (`plan_layers`): a balanced
  or blocked plan's realised density, not 1 - level."""
  layers = plan_layers(config, models.abstract_variables(model, config, meta), level)
  return {tuple(layer.name.split('/')): layer.density for layer in layers}


def format_table(report: FlopReport) -> str:
  """One line per layer (dense MFLOPs, density, MFLOPs) and the totals."""
  width = max(len(name) for name in report.per_layer)
  lines = [f'{"layer":<{width}}  {"dense MFLOPs":>12}  {"density":>7}  {"MFLOPs":>12}']
  for name, layer in report.per_layer.items():
    lines.append(
      f'{name:<{width}}  {layer.dense_flops / 1e6:12.3f}  {layer.density:7.4f}'
      f'  {layer.flops / 1e6:12.3f}'
    )
  lines.append(
    f'{"total (per example)":<{width}}  {report.forward_dense / 1e6:12.3f}  '
    f'{report.forward / max(report.forward_dense, 1.0):7.4f}  {report.forward / 1e6:12.3f}'
  )
  return '\n'.join(lines)
