"""Masked sparse layers: Flax Dense / Conv modules whose kernels are declared sparse.

At init a layer whose kernel is sparse creates a boolean marker in the 'sparse' collection at
the kernel's path, so `variables['sparse']` mirrors the sparse kernels of `variables['params']`
and the sparsity engine finds them from the variables alone (`sparse_kernel_paths`). `apply`
never needs that collection. The kernels themselves are dense arrays; the sparsity rule zeroes
their inactive weights (masked execution).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sift_jax.sparse_layers import conv

Initializer = Callable[..., jax.Array]
NormFactory = Callable[..., nn.Module]

SPARSE_COLLECTION = 'sparse'


def declare_sparse(module: nn.Module) -> None:
  """Marks `module`'s 'kernel' as sparse in the 'sparse' collection (at init only)."""
  if module.is_initializing():
    module.variable(SPARSE_COLLECTION, 'kernel', lambda: jnp.ones((), jnp.bool_))


class SparseDense(nn.Dense):
  """nn.Dense whose kernel is declared sparse."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    declare_sparse(self)
    return super().__call__(inputs)


class SparseConv(nn.Conv):
  """nn.Conv whose kernel is declared sparse, run by the model's conv implementation (conv.py)."""

  conv_general_dilated: Callable[..., jax.Array] | None = conv.conv_general_dilated

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    declare_sparse(self)
    return super().__call__(inputs)


class ConvNorm(nn.Module):
  """A convolution followed by the block's normalisation: the unit a Sparse-IFT member replaces.

  Members such as Sparse Parallel give each branch its own normalisation, so the norm belongs to
  the replaced unit, not to the model. `norm` builds a normalisation module from a name
  (e.g. a partial of nn.BatchNorm with the train flag bound).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  kernel_init: Initializer
  norm: NormFactory
  sparse: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv_cls = SparseConv if self.sparse else nn.Conv
    pad = [((k - 1) // 2, (k - 1) // 2) for k in self.kernel_size]  # PyTorch's padding
    x = conv_cls(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=pad,
      use_bias=False,
      kernel_init=self.kernel_init,
      dtype=self.dtype,
      conv_general_dilated=conv.conv_general_dilated,
      name='conv',
    )(x)
    return self.norm(name='norm')(x)


def dense_layer(
  cls: type[nn.Dense],
  features: int,
  name: str,
  kernel_init: Initializer,
  use_bias: bool,
  dtype: Any,
) -> nn.Module:
  """A shape-keeping Dense layer of class `cls` (biases start at zero)."""
  return cls(
    features,
    use_bias=use_bias,
    kernel_init=kernel_init,
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    name=name,
  )


def conv_unit(
  cls: type[ConvNorm],
  features: int,
  kernel_size: Sequence[int],
  name: str,
  kernel_init: Initializer,
  norm: NormFactory,
  strides: Sequence[int],
  sparse: bool,
  dtype: Any,
) -> nn.Module:
  """A shape-keeping bias-free conv + normalisation unit of class `cls`."""
  return cls(
    features=features,
    kernel_size=tuple(kernel_size),
    strides=tuple(strides),
    kernel_init=kernel_init,
    norm=norm,
    sparse=sparse,
    dtype=dtype,
    name=name,
  )


def sparse_kernel_paths(variables: Mapping[str, Any]) -> list[tuple[str, ...]]:
  """Paths (inside variables['params']) of every kernel a layer declared sparse, sorted."""
  if SPARSE_COLLECTION not in variables:
    raise ValueError(
      f'variables have no {SPARSE_COLLECTION!r} collection (collections: {sorted(variables)}); '
      'pass the full output of model.init'
    )
  leaves = jax.tree_util.tree_flatten_with_path(variables[SPARSE_COLLECTION])[0]
  return sorted(tuple(k.key for k in path) for path, _ in leaves)
