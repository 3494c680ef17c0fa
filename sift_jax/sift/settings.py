"""The `sift` config group, resolved and checked: which member, at which sparsity, which switches.

Keys (missing ones take `SIFT_DEFAULTS`; unknown keys are an error):
  name                dense | wide | parallel | factorized | doped
  match_flops         solve the sparse kernels' mask sparsity so whole-model forward FLOPs equal
                      the dense model's (sift_jax.sift.match); the member is still sized by
                      sparsity.level
  factorized_between  what sits between Sparse Factorized's U and V: none | norm | norm_relu
  doped_sparse_uv     True reproduces the original release, which also sparsifies Sparse Doped's
                      low-rank U and V (and so is not iso-FLOP); False keeps them dense (docs/methods.md)
  rounding            original (b = round(1/(1-s)), as the released code) | exact
The sparsity s is `config.sparsity.level`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from sift_jax.registry import SIFT_MEMBERS
from sift_jax.sift import sizes

BETWEEN = ('none', 'norm', 'norm_relu')
SIFT_DEFAULTS: dict[str, Any] = {
  'name': 'dense',
  'match_flops': False,
  'factorized_between': 'norm_relu',
  'doped_sparse_uv': False,
  'rounding': 'original',
}


@dataclasses.dataclass(frozen=True)
class SiftSettings:
  """The resolved `sift` group plus the sparsity s that sizes the member (hashable)."""

  name: str = 'dense'
  level: float = 0.0
  match_flops: bool = False
  factorized_between: str = 'norm_relu'
  doped_sparse_uv: bool = False
  rounding: str = 'original'

  def __post_init__(self):
    SIFT_MEMBERS.get(self.name)
    sizes.check_level(self.level)
    if self.factorized_between not in BETWEEN:
      raise ValueError(
        f'sift.factorized_between {self.factorized_between!r}; allowed: {", ".join(BETWEEN)}'
      )
    if self.rounding not in sizes.ROUNDINGS:
      raise ValueError(f'sift.rounding {self.rounding!r}; allowed: {", ".join(sizes.ROUNDINGS)}')
    if self.match_flops and self.name == 'dense':
      raise ValueError(
        'sift.match_flops needs a Sparse-IFT member (wide, parallel, factorized, doped); '
        'sift.name is dense'
      )


def from_config(config: ml_collections.ConfigDict) -> SiftSettings:
  """`config.sift` over `SIFT_DEFAULTS`, with s = config.sparsity.level; bad values raise."""
  given = dict(config.sift) if 'sift' in config else {}
  unknown = sorted(set(given) - set(SIFT_DEFAULTS))
  if unknown:
    raise ValueError(f'unknown sift key(s) {unknown}; allowed: {", ".join(sorted(SIFT_DEFAULTS))}')
  resolved = {**SIFT_DEFAULTS, **given}
  sparsity = config.get('sparsity', ml_collections.ConfigDict())
  distribution = sparsity.get('distribution', 'uniform')
  if resolved['name'] != 'dense' and distribution != 'uniform':
    raise ValueError(
      f'sift.name={resolved["name"]!r} needs sparsity.distribution=uniform (every transformed '
      f'kernel at s is what makes the member iso-FLOP), got {distribution!r}'
    )
  return SiftSettings(
    name=str(resolved['name']),
    level=float(sparsity.get('level', 0.0)),
    match_flops=bool(resolved['match_flops']),
    factorized_between=str(resolved['factorized_between']),
    doped_sparse_uv=bool(resolved['doped_sparse_uv']),
    rounding=str(resolved['rounding']),
  )
