"""Parameters and FLOPs of a Sparse-IFT model against its dense original, from shapes only.

  python -m sift_jax.sift.report            # the README table: ResNet-18 (CIFAR) and GPT-3 Small
  python -m sift_jax.sift.report --config=configs/gpt_small_wide.py:local --levels=0.5,0.75
  python -m sift_jax.sift.report --members=wide,doped --levels=0.9

Two FLOP figures (docs/methods.md section 1): whole-model forward FLOPs, and the FLOPs of the transformed
layers (every module a member built in place of a layer, `layers.is_unit`) against the dense
layers they replace. Masks count at the densities the sparsity engine realises: the exact
active counts round((1 - s) n) / n, or K = round((1 - s) R) blocks in every block-column of a
balanced plan (flops.plan_layers), which may miss 1 - s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from sift_jax import config_lib, flops, models
from sift_jax.sift import layers, match
from sift_jax.sift import settings as settings_lib
from sift_jax.sparse_layers import sparse_kernel_paths

LEVELS = (0.5, 0.75, 0.9)
MEMBERS = ('wide', 'parallel', 'factorized', 'doped')


@dataclasses.dataclass(frozen=True)
class SiftFlops:
  """One model's size and per-example forward FLOPs, and its dense original's."""

  name: str  # member
  level: float  # the s that sizes the member
  mask_level: float  # the sparsity its sparse kernels are held at (solved with match_flops)
  params: int
  active_params: int  # dense weights plus the active entries of the sparse kernels
  forward: float  # whole model, masks at their density
  transformed: float  # the transformed layers only, masks at their density
  dense_params: int  # the dense original (sift.name = dense, no masks)
  dense_forward: float
  dense_transformed: float


def transformed_units(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  meta: Mapping[str, Any],
  variables: Mapping[str, Any] | None = None,
) -> list[str]:
  """Paths ('layer1_0/conv1', 'Block_0/query') of the modules that replace a transformed layer.

  `variables` are the model's abstract variables when the caller already has them.
  """
  if variables is None:
    variables = models.abstract_variables(model, config, meta)
  variables = {k: v for k, v in variables.items() if k != 'sparse'}
  x = models.example_input(config, meta)
  units: set[str] = set()

  def record(next_fun, args, kwargs, context):
    if layers.is_unit(context.module) and context.method_name == '__call__':
      units.add('/'.join(context.module.path))
    return next_fun(*args, **kwargs)

  def forward(variables, x):
    with nn.intercept_methods(record):
      return model.apply(variables, x, train=False)

  jax.eval_shape(forward, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return sorted(units)


@dataclasses.dataclass(frozen=True)
class _Shapes:
  """A model's dense FLOP report, its kernels' sizes, sparse kernels and transformed units."""

  config: ml_collections.ConfigDict
  variables: Mapping[str, Any]  # abstract
  report: flops.FlopReport
  sizes: dict[tuple[str, ...], int]
  sparse_paths: list[tuple[str, ...]]
  units: list[str]

  def densities(self, level: float) -> dict[str, float]:
    """{'hidden_0/kernel': density} of the masks the run's rule plans at `level`."""
    return match.layer_densities(self.config, self.variables, level)

  def measure(self, level: float | None) -> tuple[int, int, float, float]:
    """(params, active params, forward, transformed-layer FLOPs), the sparse kernels at the
    densities their masks realise at `level` (None: no masks)."""
    layers = [] if level is None else flops.plan_layers(self.config, self.variables, level)
    density = {layer.name: layer.density for layer in layers}
    forward = transformed = 0.0
    for name, layer in self.report.per_layer.items():
      f = layer.dense_flops * density.get(name, 1.0)
      forward += f
      if any(name.startswith(unit + '/') for unit in self.units):
        transformed += f
    params = sum(self.sizes.values())
    return params, params - sum(ly.size - ly.active for ly in layers), forward, transformed


def _shapes(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> _Shapes:
  model = models.build_model(config, meta)
  variables = models.abstract_variables(model, config, meta)
  flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  return _Shapes(
    config=config,
    variables=variables,
    report=flops.count_forward_flops(model, config, meta),
    sizes={tuple(k.key for k in path): int(np.prod(leaf.shape)) for path, leaf in flat},
    sparse_paths=sparse_kernel_paths(variables),
    units=transformed_units(model, config, meta, variables),
  )


@functools.lru_cache(maxsize=16)
def _dense_reference(config_json: str, meta_items: tuple[tuple[str, Any], ...]):
  config = ml_collections.ConfigDict(json.loads(config_json))
  return _shapes(config, dict(meta_items)).measure(None)


def sift_flops(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> SiftFlops:
  """Measures config's model: its member at sparsity.level, the masks at the level the rule
  uses (`match.mask_level`: solved with match_flops), and its dense original."""
  s = settings_lib.from_config(config)
  shapes = _shapes(config, meta)
  meta_items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in meta.items()))
  dense_params, _, dense_forward, dense_transformed = _dense_reference(
    match.dense_config(config).to_json(), meta_items
  )
  mask_level = s.level
  if s.match_flops:
    mask_level = match.matched_level(
      shapes.report, shapes.sparse_paths, shapes.sizes, dense_forward, shapes.densities
    )
  params, active, forward, transformed = shapes.measure(mask_level)
  return SiftFlops(
    s.name,
    s.level,
    mask_level,
    params,
    active,
    forward,
    transformed,
    dense_params,
    dense_forward,
    dense_transformed,
  )


def configured(
  config: ml_collections.ConfigDict, name: str, level: float, match_flops: bool = False
) -> ml_collections.ConfigDict:
  """A copy of config with member `name` at sparsity `level`."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.sift.name = name
  c.sift.match_flops = match_flops
  c.sparsity.level = level
  c.sparsity.rule = 'static' if level > 0 else 'dense'
  c.sparsity.distribution = 'uniform'
  return c


def table_rows(
  config: ml_collections.ConfigDict,
  meta: Mapping[str, Any],
  members: Sequence[str] = MEMBERS,
  levels: Sequence[float] = LEVELS,
  progress: Callable[[str], None] = lambda line: None,
) -> list[SiftFlops]:
  """Every member at every level; Sparse Wide also with match_flops where a solution exists.

  Each row traces the model (seconds for GPT-3 Small): `progress` gets a line before each.
  """
  rows = []
  for i, (level, name) in enumerate(itertools.product(levels, members)):
    progress(f'{config.model.name} {name} s={level:g} ({i + 1}/{len(levels) * len(members)})')
    rows.append(sift_flops(configured(config, name, level), meta))
    if name == 'wide':
      # GPT at s = 0.9 has none: the widened LM head alone exceeds the dense budget.
      with contextlib.suppress(match.NoMatchingLevel):
        rows.append(sift_flops(configured(config, name, level, match_flops=True), meta))
  return rows


def markdown_table(title: str, rows: Sequence[SiftFlops]) -> str:
  """Params, active params and FLOPs relative to the dense model, one row per member and s."""
  if not rows:
    raise ValueError('no rows to tabulate')
  first = rows[0]
  lines = [
    f'**{title}**: dense {first.dense_params / 1e6:.2f}M params, '
    f'{first.dense_forward / 1e9:.3f} GFLOPs forward per example',
    '',
    '| member | s | mask s | params | active params | forward FLOPs | transformed-layer FLOPs |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    member = f'{r.name} (match_flops)' if r.mask_level != r.level else r.name
    lines.append(
      f'| {member} | {r.level:g} | {r.mask_level:.4f} | {r.params / r.dense_params:.2f}x '
      f'| {r.active_params / r.dense_params:.2f}x | {r.forward / r.dense_forward:.3f}x '
      f'| {r.transformed / r.dense_transformed:.3f}x |'
    )
  return '\n'.join(lines)


def paper_models() -> list[tuple[str, ml_collections.ConfigDict, dict[str, Any]]]:
  """(title, config, data meta) of the README's models, at full size."""
  out = []
  for title, model, meta in (
    (
      'ResNet-18, CIFAR-100',
      models.model_config('resnet', depth=18, stem='cifar', width=64),
      {'num_classes': 100, 'image_shape': (32, 32, 3)},
    ),
    (
      'GPT-3 Small, context 1024',
      models.model_config('gpt', **models.gpt_preset('gpt3_small')),
      {'vocab_size': 50257, 'seq_len': 1024},
    ),
  ):
    c = config_lib.base_config()
    c.model = model
    out.append((title, c, meta))
  return out


def check_choices(members: Sequence[str], levels: Sequence[float]) -> None:
  """Raises ValueError naming a member or level the table cannot have."""
  unknown = [m for m in members if m not in MEMBERS]
  if unknown or not members:
    raise ValueError(f'--members={",".join(members)}: pick from {", ".join(MEMBERS)}')
  bad = [s for s in levels if not 0.0 < s < 1.0]
  if bad or not levels:
    raise ValueError(f'--levels={",".join(map(str, levels))}: each must lie in (0, 1)')


def main(argv: list[str]) -> None:
  from absl import app, flags

  from sift_jax import data

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  members = flags.FLAGS.members
  try:
    levels = [float(s) for s in flags.FLAGS.levels]
  except ValueError:
    config_lib.fail(f'--levels={",".join(flags.FLAGS.levels)}: give numbers in (0, 1)')
  try:
    check_choices(members, levels)
  except ValueError as e:
    config_lib.fail(str(e))
  if 'config' in flags.FLAGS:
    config = flags.FLAGS.config
    cases = [(f'{config.model.name}, {config.data.name}', config, data.dataset_meta(config))]
  else:
    cases = paper_models()
  start = time.monotonic()

  def progress(line: str) -> None:  # on stderr, so stdout stays the markdown tables
    print(f'[{time.monotonic() - start:4.0f} s] {line}', file=sys.stderr, flush=True)

  for title, config, meta in cases:
    print(markdown_table(title, table_rows(config, meta, members, levels, progress)))
    print(flush=True)


if __name__ == '__main__':
  # Flags are defined here, not at import, so importing this module defines no global flags.
  from absl import app, flags

  flags.DEFINE_list('members', list(MEMBERS), 'Sparse-IFT members to tabulate.')
  flags.DEFINE_list('levels', [f'{s:g}' for s in LEVELS], 'Sparsity levels s.')
  _argv = sys.argv
  if any(a == '--config' or a.startswith('--config=') for a in _argv):
    # One config's model, sized by its dataset, instead of the two paper models.
    _argv = config_lib.define_config_flag(_argv)[1]
  app.run(main, argv=_argv)
