"""Flax linen layers of Sparse Parallel, Sparse Factorized and Sparse Doped (docs/methods.md section 1).

Each module replaces one Dense layer (`kernel_size=()`) or one convolution + normalisation unit
of a ResNet block (`kernel_size=(3, 3)`), and builds its kernels with the layer factory's
`SparseDense` / `SparseConv`, so exactly the kernels meant to be sparse are declared in the
'sparse' collection (sift_jax.sparse_layers). Sizes come from sift_jax.sift.sizes at trace time,
from the input's feature count: D_in = C_in * kh * kw for a convolution.

Normalisation: `norm` builds one normalisation module from a name (the model's BatchNorm for
the conv form; LayerNorm by default for the Dense form).
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from sift_jax.sift import sizes
from sift_jax.sparse_layers import ConvNorm, Initializer, NormFactory, SparseConv, SparseDense

LAYER_NORM: NormFactory = functools.partial(nn.LayerNorm, epsilon=1e-5)


def is_unit(module: nn.Module) -> bool:
  """Whether `module` is a transformed layer (a Sparse-IFT unit), for FLOP reports."""
  return getattr(type(module), 'sift_unit', False)


class TransformedDense(SparseDense):
  """A transformed Dense layer that keeps its shape (dense and wide members)."""

  sift_unit: ClassVar[bool] = True


class TransformedConvNorm(ConvNorm):
  """A transformed conv + norm unit that keeps its shape (dense and wide members)."""

  sift_unit: ClassVar[bool] = True


class _Linear(nn.Module):
  """The base of the members: builds their Dense or Conv kernels and their normalisations."""

  sift_unit: ClassVar[bool] = True
  features: int
  kernel_init: Initializer
  kernel_size: tuple[int, ...] = ()  # () = Dense
  strides: tuple[int, ...] = ()
  use_bias: bool = False
  norm: NormFactory = LAYER_NORM
  dtype: Any = jnp.float32

  def fan_in(self, x: jax.Array) -> int:
    return x.shape[-1] * math.prod(self.kernel_size)

  def linear(
    self, features: int, name: str, *, sparse: bool, use_bias: bool, pointwise: bool = False
  ) -> nn.Module:
    """A Dense or a conv with PyTorch's padding; `pointwise` makes the conv 1x1 with stride 1."""
    if not self.kernel_size:
      cls = SparseDense if sparse else nn.Dense
      return cls(
        features,
        use_bias=use_bias,
        kernel_init=self.kernel_init,
        bias_init=nn.initializers.zeros,
        dtype=self.dtype,
        name=name,
      )
    kernel = (1,) * len(self.kernel_size) if pointwise else self.kernel_size
    strides = (1,) * len(self.kernel_size) if pointwise else (self.strides or None)
    cls = SparseConv if sparse else nn.Conv
    return cls(
      features,
      kernel,
      strides=strides,
      padding=[((k - 1) // 2, (k - 1) // 2) for k in kernel],
      use_bias=use_bias,
      kernel_init=self.kernel_init,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      name=name,
    )

  def make_norm(self, name: str) -> nn.Module:
    return self.norm(dtype=self.dtype, name=name)


class SparseParallel(_Linear):
  """sum_i norm_i(layer_i(x)) over `branches` sparse copies of the layer (each with its bias)."""

  branches: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = 0.0
    for i in range(self.branches):
      h = self.linear(self.features, f'branch_{i}', sparse=True, use_bias=self.use_bias)(x)
      out = out + self.make_norm(f'norm_{i}')(h)  # (..., features)
    return out


class SparseFactorized(_Linear):
  """sparse U (D_in -> d) -> none | norm | norm + ReLU -> sparse V (d -> D_out) [-> out norm].

  d = factorized_rank(D_in, D_out, s). In the conv form U has the layer's kernel and stride and V
  is 1x1, so the MACs per output position are d (D_in + D_out); `out_norm` adds the block's
  normalisation after V (the ResNet unit).
  """

  level: float = 0.0
  between: str = 'norm_relu'
  out_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = sizes.factorized_rank(self.fan_in(x), self.features, self.level)
    h = self.linear(d, 'u', sparse=True, use_bias=False)(x)  # (..., d)
    if self.between in ('norm', 'norm_relu'):
      h = self.make_norm('u_norm')(h)
    if self.between == 'norm_relu':
      h = nn.relu(h)
    y = self.linear(self.features, 'v', sparse=True, use_bias=self.use_bias, pointwise=True)(h)
    return self.make_norm('norm')(y) if self.out_norm else y  # (..., features)


class SparseDoped(_Linear):
  """sparse W x + V (U x), U (D_in -> r) and V (r -> D_out) dense and linear [-> out norm].

  r = doped_rank(D_in, D_out, s); at r = 0 (s near 0) only the sparse path remains.
  `sparse_uv` declares U and V sparse too, as the original release did.
  """

  level: float = 0.0
  sparse_uv: bool = False
  out_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    r = sizes.doped_rank(self.fan_in(x), self.features, self.level)
    y = self.linear(self.features, 'sparse', sparse=True, use_bias=self.use_bias)(x)
    if r:
      low = self.linear(r, 'u', sparse=self.sparse_uv, use_bias=False)(x)  # (..., r)
      y = y + self.linear(
        self.features, 'v', sparse=self.sparse_uv, use_bias=False, pointwise=True
      )(low)
    return self.make_norm('norm')(y) if self.out_norm else y  # (..., features)
