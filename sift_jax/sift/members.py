"""The five members, registered in `registry.SIFT_MEMBERS`: what each builds in place of a layer.

A member answers two questions for the layer factory (sift_jax.models.layers): the model-level
width factor (only Sparse Wide widens), and the replacement of one transformed Dense layer or of
one convolution + normalisation unit. Dense and Sparse Wide keep the layer itself, sparse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from sift_jax.registry import SIFT_MEMBERS
from sift_jax.sift import settings as settings_lib
from sift_jax.sift import sizes
from sift_jax.sift.layers import (
  SparseDoped,
  SparseFactorized,
  SparseParallel,
  TransformedConvNorm,
  TransformedDense,
)
from sift_jax.sparse_layers import Initializer, NormFactory, conv_unit, dense_layer


@SIFT_MEMBERS.register('dense')
class Member:
  """The `dense` member (plain sparse training) and the base of the others: each transformed
  layer keeps its shape and its kernel is sparse."""

  def __init__(self, settings: settings_lib.SiftSettings):
    self.settings = settings

  def width_factor(self) -> float:
    return 1.0

  def dense(
    self,
    features: int,
    *,
    name: str,
    kernel_init: Initializer,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
  ) -> nn.Module:
    """The replacement of a transformed Dense layer (x: (..., D_in) -> (..., features))."""
    return dense_layer(TransformedDense, features, name, kernel_init, use_bias, dtype)

  def conv(
    self,
    features: int,
    kernel_size: Sequence[int],
    *,
    name: str,
    kernel_init: Initializer,
    norm: NormFactory,
    strides: Sequence[int] = (1, 1),
    dtype: Any = jnp.float32,
  ) -> nn.Module:
    """The replacement of a transformed bias-free conv + its normalisation."""
    return conv_unit(
      TransformedConvNorm, features, kernel_size, name, kernel_init, norm, strides, True, dtype
    )


class _Replacing(Member):
  """A member that replaces each layer with its module class of sift_jax.sift.layers."""

  layer_cls: type[nn.Module]
  # The conv form ends in the block's normalisation (Sparse Parallel's branches carry their own).
  unit_norm: bool = True

  def options(self) -> dict[str, Any]:
    """The member's own module attributes (sizes and switches)."""
    return {}

  def dense(self, features, *, name, kernel_init, use_bias=True, dtype=jnp.float32):
    return self.layer_cls(
      features=features,
      kernel_init=kernel_init,
      use_bias=use_bias,
      dtype=dtype,
      name=name,
      **self.options(),
    )

  def conv(
    self, features, kernel_size, *, name, kernel_init, norm, strides=(1, 1), dtype=jnp.float32
  ):
    unit = {'out_norm': True} if self.unit_norm else {}
    return self.layer_cls(
      features=features,
      kernel_init=kernel_init,
      kernel_size=tuple(kernel_size),
      strides=tuple(strides),
      norm=norm,
      dtype=dtype,
      name=name,
      **unit,
      **self.options(),
    )


@SIFT_MEMBERS.register('wide')
class WideMember(Member):
  """Sparse Wide: the layers stay as they are; the model multiplies its widths by the factor."""

  def width_factor(self) -> float:
    return sizes.width_factor(self.settings.level, self.settings.rounding)


@SIFT_MEMBERS.register('parallel')
class ParallelMember(_Replacing):
  """Sparse Parallel: b sparse copies, each with its own normalisation, summed."""

  layer_cls = SparseParallel
  unit_norm = False

  def options(self) -> dict[str, Any]:
    return {'branches': sizes.branch_count(self.settings.level, self.settings.rounding)}


@SIFT_MEMBERS.register('factorized')
class FactorizedMember(_Replacing):
  """Sparse Factorized: sparse U -> (norm, ReLU) -> sparse V, inner width from the formula."""

  layer_cls = SparseFactorized

  def options(self) -> dict[str, Any]:
    return {'level': self.settings.level, 'between': self.settings.factorized_between}


@SIFT_MEMBERS.register('doped')
class DopedMember(_Replacing):
  """Sparse Doped: dense low-rank U V plus a sparse full weight, summed."""

  layer_cls = SparseDoped

  def options(self) -> dict[str, Any]:
    return {'level': self.settings.level, 'sparse_uv': self.settings.doped_sparse_uv}


def member(config: ml_collections.ConfigDict) -> Member:
  """The member named by config.sift.name, sized by config.sparsity.level."""
  s = settings_lib.from_config(config)
  return SIFT_MEMBERS.get(s.name)(s)
