"""Which weights are sparse and at what density: the static plan every rule works from.

A plan is computed once on the host from the params' shapes: the sparse leaves (by position
in the flattened params tree), their names ('Dense_0/kernel'), shapes, block shape and the
exact active count round((1 - s_l) * n_l) of each layer, with s_l from a distribution
(`uniform`, `erk`) plus per-layer overrides. A balanced plan (block-sparse execution) keeps
round((1 - s_l) * rows) active blocks in every output block-column instead.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from sift_jax.registry import DISTRIBUTIONS
from sift_jax.sparsity import select

Path = tuple[str, ...]

# A layer whose realised density misses its target 1 - s by more than this (absolute) is named
# in the plan's line and in summary.json (`drift_facts`).
DRIFT_TOLERANCE = 0.01
# Path parts that mark embeddings and normalisation layers, never sparse by default.
_DENSE_PARTS = re.compile(r'embed|norm|^ln|_ln|^bn|_bn|batchnorm|layernorm|wte|wpe', re.I)


def key_str(k: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_of(keypath: Sequence[Any]) -> Path:
  """A jax key path as a tuple of strings; nnx's trailing `.value` is dropped."""
  parts = tuple(key_str(k) for k in keypath)
  if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and parts[-1] == 'value':
    parts = parts[:-1]
  return parts


def _strip_root(path: Path) -> Path:
  return path[1:] if path and path[0] == 'params' else path


def network_order(tree: Any, prefix: Path = ()) -> list[Path]:
  """Leaf paths in the order the network creates them: mappings in insertion order.

  Flax builds its params dicts in call order, so `model.init(...)['params']` lists the first
  layer first. jax's own flattening sorts dict keys (and a params tree that went through
  jax.jit or jax.eval_shape comes back sorted), so the order is read from the mappings
  themselves; other containers follow jax's order.
  """
  if isinstance(tree, Mapping):
    return [q for k, v in tree.items() for q in network_order(v, (*prefix, key_str(k)))]
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(*prefix, *path_of(kp)) for kp, _ in flat]


def default_sparse_paths(paths: Sequence[Path], shapes: Sequence[tuple[int, ...]]) -> list[Path]:
  """docs/methods.md section 2: kernels with >= 2 dims except the first, the last, embeddings, norms.

  First and last are by the order of `paths`, which should be network order (`network_order`).
  """
  kernels = [
    p
    for p, s in zip(paths, shapes, strict=True)
    if len(s) >= 2 and p and p[-1] == 'kernel' and not any(_DENSE_PARTS.search(q) for q in p)
  ]
  return kernels[1:-1]


@dataclasses.dataclass(frozen=True)
class Layer:
  """One sparse leaf: where it is, how big, and how many of its blocks stay active."""

  index: int  # position among the flattened params leaves
  name: str  # 'Dense_0/kernel'
  shape: tuple[int, ...]
  block: tuple[int, int]
  sparsity: float
  active_blocks: int
  floored: bool = False  # round((1 - s) n) was 0: raised to the floor of one active block
  balanced: bool = False  # the same number of active blocks in every output block-column

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def blocks(self) -> int:
    return select.num_blocks(self.shape, self.block)

  @property
  def columns(self) -> int:
    """Output block-columns: the last axis in blocks."""
    return self.shape[-1] // self.block[1]

  @property
  def block_size(self) -> int:
    return self.block[0] * self.block[1]

  @property
  def active(self) -> int:
    return self.active_blocks * self.block_size

  @property
  def density(self) -> float:
    """The realised density: balanced and blocked counts round, so it may miss 1 - sparsity."""
    return self.active / self.size

  @property
  def drifts(self) -> bool:
    return abs(self.density - (1.0 - self.sparsity)) > DRIFT_TOLERANCE


def exact_count(density: float, n: int) -> int:
  return int(round(density * n))


@DISTRIBUTIONS.register('uniform')
def uniform(shapes: Sequence[tuple[int, ...]], sparsity: float, power_scale: float) -> list[float]:
  """Every layer at the global sparsity."""
  del power_scale
  return [sparsity] * len(shapes)


@DISTRIBUTIONS.register('erk')
def erk(shapes: Sequence[tuple[int, ...]], sparsity: float, power_scale: float) -> list[float]:
  """Erdos-Renyi-Kernel: density_l = eps * (sum(shape_l) / prod(shape_l)) ** power_scale.

  eps is solved so the active total is (1 - s) * sum(n_l); a layer whose density would exceed 1
  is made dense and eps is solved again over the others (`fill_densities`).
  """
  sizes = np.array([np.prod(s) for s in shapes], dtype=np.float64)
  raw = np.array([(np.sum(s) / np.prod(s)) ** power_scale for s in shapes])
  return [float(1.0 - d) for d in fill_densities(raw, sizes, (1.0 - sparsity) * sizes.sum())]


def fill_densities(weights: np.ndarray, sizes: np.ndarray, budget: float) -> np.ndarray:
  """Densities min(1, eps * weights_l) with eps solved so sum(density_l * sizes_l) = budget.

  A layer that would exceed 1 is made dense and eps is solved again over the others.
  """
  weights, sizes = np.asarray(weights, np.float64), np.asarray(sizes, np.float64)
  dense = np.zeros(len(sizes), bool)
  while True:
    rest = budget - sizes[dense].sum()
    eps = rest / np.sum(weights[~dense] * sizes[~dense]) if (~dense).any() else 0.0
    over = ~dense & (eps * weights > 1.0)
    if not over.any():
      break
    dense |= over
  return np.where(dense, 1.0, eps * weights)


def parse_overrides(text: str) -> list[tuple[str, float]]:
  """'Dense_0/kernel=0.5, *attn*=0.8' -> [(pattern, sparsity), ...] (fnmatch on names)."""
  out = []
  for part in (text or '').split(','):
    part = part.strip()
    if not part:
      continue
    if '=' not in part:
      raise ValueError(f'sparsity.overrides entry {part!r} is not pattern=sparsity')
    pattern, value = part.rsplit('=', 1)
    out.append((pattern.strip(), float(value)))
  return out


def check_level(value: float, what: str) -> None:
  if not 0.0 <= value < 1.0:
    raise ValueError(f'{what}={value} is outside [0, 1)')


def make_plan(
  params_shapes: Any,
  sparsity: float,
  distribution: str = 'uniform',
  sparse_paths: Sequence[Sequence[str]] | None = None,
  overrides: str = '',
  power_scale: float = 1.0,
  block: tuple[int, int] = (1, 1),
  balanced: bool = False,
) -> list[Layer]:
  """The sparse layers of a params tree (shapes or arrays) with their exact active counts.

  `balanced` counts per output block-column: round((1 - s_l) * blocks per column) in each.

  `sparse_paths` are the kernels the model declares sparse (a leading 'params' is ignored);
  None applies the default filter, first and last layer by network order (`network_order`). An override `pattern=s` sets a layer's sparsity (making it
  sparse if it was not; s = 0 makes it dense) and must match some parameter.
  """
  check_level(sparsity, 'sparsity.level')
  dist = DISTRIBUTIONS.get(distribution)
  flat = jax.tree_util.tree_flatten_with_path(params_shapes)[0]
  paths = [path_of(kp) for kp, _ in flat]
  shapes = [tuple(leaf.shape) for _, leaf in flat]
  names = ['/'.join(_strip_root(p)) for p in paths]
  if sparse_paths is None:
    rank = {p: i for i, p in enumerate(network_order(params_shapes))}
    order = sorted(range(len(paths)), key=lambda i: rank.get(paths[i], i))
    chosen = {
      _strip_root(p)
      for p in default_sparse_paths([paths[i] for i in order], [shapes[i] for i in order])
    }
  else:
    chosen = {_strip_root(tuple(str(q) for q in p)) for p in sparse_paths}
    known = {_strip_root(p) for p in paths}
    missing = sorted('/'.join(p) for p in chosen - known)
    if missing:
      raise ValueError(f'sparse paths {missing} are not in the params tree')
  is_sparse = [_strip_root(p) in chosen for p in paths]
  fixed: dict[int, float] = {}
  for pattern, value in parse_overrides(overrides):
    check_level(value, f'sparsity.overrides {pattern!r}')
    hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
      raise ValueError(
        f'sparsity.overrides pattern {pattern!r} names no parameter; parameters: {names}'
      )
    for i in hits:
      fixed[i] = value
      is_sparse[i] = value > 0 or is_sparse[i]
  free = [i for i in range(len(flat)) if is_sparse[i] and i not in fixed]
  levels = dict(fixed)
  levels.update(zip(free, dist([shapes[i] for i in free], sparsity, power_scale), strict=True))
  layers = []
  for i in range(len(flat)):
    if not is_sparse[i] or levels[i] == 0.0 and i in fixed:
      continue
    select.check_block(shapes[i], block, names[i])
    nb = select.num_blocks(shapes[i], block)
    cols = shapes[i][-1] // block[1]
    per_column = exact_count(1 - levels[i], nb // cols)
    count = cols * per_column if balanced else exact_count(1 - levels[i], nb)
    # A sparse layer with nothing active would cut the network: keep one block (per column
    # when balanced, so every column keeps the same count).
    floor = cols if balanced else 1
    layers.append(
      Layer(
        i,
        names[i],
        shapes[i],
        block,
        levels[i],
        max(count, floor),
        floored=count == 0,
        balanced=balanced,
      )
    )
  return layers


def describe(layers: Sequence[Layer]) -> str:
  """The plan in one line: sparse layers, active weights, and any layer raised to the floor."""
  total = sum(layer.size for layer in layers)
  active = sum(layer.active for layer in layers)
  line = (
    f'sparsity plan: {len(layers)} sparse layers, {active:,} of {total:,} weights active '
    f'(density {active / max(total, 1):.6g})'
  )
  floored = [layer for layer in layers if layer.floored]
  if floored:
    line += '; raised to one active block (round((1 - s) n) was 0): ' + ', '.join(
      f'{layer.name} (s={layer.sparsity:g}, n={layer.blocks})' for layer in floored
    )
  drifted = drift_facts(layers).get(DRIFT_KEY, {})
  if drifted:
    line += f'; realised density off the target by more than {DRIFT_TOLERANCE:g}: ' + ', '.join(
      f'{name} ({d["realised"]:.4g}, target {d["target"]:.4g})' for name, d in drifted.items()
    )
  return line


DRIFT_KEY = 'sparsity/plan_density_drift'


def drift_facts(layers: Sequence[Layer]) -> dict[str, Any]:
  """{DRIFT_KEY: {layer: {'target', 'realised'}}} for summary.json, naming each layer whose
  realised density misses 1 - s by more than DRIFT_TOLERANCE; {} when none does."""
  drifted = {
    layer.name: {'target': 1.0 - layer.sparsity, 'realised': layer.density}
    for layer in layers
    if layer.drifts
  }
  return {DRIFT_KEY: drifted} if drifted else {}
