"""The layer factory: every sparse or Sparse-IFT-transformed layer of the models is built here.

The models never construct their sparse layers directly. They call `make_dense` / `make_conv`
with the layer's dense shape, so a Sparse-IFT member (chosen by `config.sift.name`) replaces the
layer in this one place, and `scale_width` applies the model-level widening of Sparse Wide.

The layers themselves live in sift_jax.sparse_layers (below both this module and sift_jax.sift):
sparse kernels declare themselves in the 'sparse' collection there, and `sparse_kernel_paths`
reads them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from sift_jax import sift
from sift_jax.sift import sizes
from sift_jax.sparse_layers import (
  ConvNorm,
  Initializer,
  NormFactory,
  SparseDense,
  conv_unit,
  dense_layer,
  sparse_kernel_paths,
)

__all__ = ['make_conv', 'make_dense', 'scale_width', 'sparse_kernel_paths', 'width_factor']


def _member(config: ml_collections.ConfigDict) -> Any:
  """The Sparse-IFT member of config.sift.name (an unknown name or bad switch raises)."""
  return sift.member(config)


def width_factor(config: ml_collections.ConfigDict) -> float:
  """The model-level width multiplier of the Sparse-IFT member (Sparse Wide); 1.0 for others."""
  return _member(config).width_factor()


def scale_width(config: ml_collections.ConfigDict, width: int, multiple_of: int = 1) -> int:
  """`width` times the width factor: truncated, or rounded up to a multiple (GPT head count).

  The two roundings are the original code's (docs/methods.md section 1): ResNet widths truncate
  (64 -> 90 at b = 2) and GPT's d_model rounds up to a multiple of the heads (768 -> 1092).
  """
  return sizes.scale_width(width, width_factor(config), multiple_of)


def make_dense(
  config: ml_collections.ConfigDict,
  features: int,
  *,
  name: str,
  kernel_init: Initializer,
  transform: bool = True,
  sparse: bool = True,
  use_bias: bool = True,
  dtype: Any = jnp.float32,
) -> nn.Module:
  """A Dense layer of the model, or its Sparse-IFT replacement when `transform` is True.

  `sparse` declares the kernel sparse (a transformed layer always is). Biases start at zero.
  """
  member = _member(config)
  if transform:
    return member.dense(
      features, name=name, kernel_init=kernel_init, use_bias=use_bias, dtype=dtype
    )
  return dense_layer(
    SparseDense if sparse else nn.Dense, features, name, kernel_init, use_bias, dtype
  )


def make_conv(
  config: ml_collections.ConfigDict,
  features: int,
  kernel_size: Sequence[int],
  *,
  name: str,
  kernel_init: Initializer,
  norm: NormFactory,
  strides: Sequence[int] = (1, 1),
  transform: bool = True,
  sparse: bool = True,
  dtype: Any = jnp.float32,
) -> nn.Module:
  """A bias-free convolution plus its normalisation, or the Sparse-IFT replacement of that unit.

  Untransformed (and with the dense and wide members) the parameters live at
  `<name>/conv/kernel` and `<name>/norm/...`; the other members' units are in sift_jax.sift.layers.
  """
  member = _member(config)
  if transform:
    return member.conv(
      features,
      kernel_size,
      name=name,
      kernel_init=kernel_init,
      norm=norm,
      strides=strides,
      dtype=dtype,
    )
  return conv_unit(ConvNorm, features, kernel_size, name, kernel_init, norm, strides, sparse, dtype)
