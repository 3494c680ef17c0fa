"""The Sparse Iso-FLOP Transformations (docs/methods.md section 1): size rules, layers, members, matching.

Importing this package registers the members in `registry.SIFT_MEMBERS`.
"""

from sift_jax.sift.members import Member, member
from sift_jax.sift.settings import SIFT_DEFAULTS, SiftSettings, from_config
from sift_jax.sift.sizes import (
  branch_count,
  doped_rank,
  factorized_rank,
  scale_width,
  width_factor,
)

__all__ = [
  'SIFT_DEFAULTS',
  'Member',
  'SiftSettings',
  'branch_count',
  'doped_rank',
  'factorized_rank',
  'from_config',
  'member',
  'scale_width',
  'width_factor',
]
