"""The layer factory: every sparse or Sparse-IFT-transformed layer of the models is built here.

The models never construct their sparse layers directly. They call `make_dense` / `make_conv`
with the layer's dense shape, so a Sparse-IFT member (chosen by `config.sift.name`) replaces the
layer in this one place, and `scale_width` applies the model-level widening of Sparse Wide.

Sparse kernels declare themselves: at init a layer whose kernel is sparse creates a boolean
marker in the 'sparse' collection at the kernel's path, so `variables['sparse']` mirrors the
sparse kernels of `variables['params']` and the sparsity engine finds them from the variables
alone. `apply` never needs that collection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Initializer = Callable[..., jax.Array]
NormFactory = Callable[..., nn.Module]

SPARSE_COLLECTION = 'sparse'


def _member(config: ml_collections.ConfigDict) -> Any:
  """The Sparse-IFT member of config.sift.name (an unknown name or bad switch raises)."""
  # Imported here: sift_jax.sift builds its layers from this module's SparseDense / SparseConv.
  from sift_jax import sift

  return sift.member(config)


def width_factor(config: ml_collections.ConfigDict) -> float:
  """The model-level width multiplier of the Sparse-IFT member (Sparse Wide); 1.0 for others."""
  return _member(config).width_factor()


def scale_width(config: ml_collections.ConfigDict, width: int, multiple_of: int = 1) -> int:
  """`width` times the width factor: truncated, or rounded up to a multiple (GPT head count).

  The two roundings are the original code's (SPEC.md section 1): ResNet widths truncate
  (64 -> 90 at b = 2) and GPT's d_model rounds up to a multiple of the heads (768 -> 1092).
  """
  from sift_jax.sift import sizes

  return sizes.scale_width(width, width_factor(config), multiple_of)


def _declare_sparse(module: nn.Module) -> None:
  if module.is_initializing():
    module.variable(SPARSE_COLLECTION, 'kernel', lambda: jnp.ones((), jnp.bool_))


class SparseDense(nn.Dense):
  """nn.Dense whose kernel is declared sparse."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    _declare_sparse(self)
    return super().__call__(inputs)


class SparseConv(nn.Conv):
  """nn.Conv whose kernel is declared sparse."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    _declare_sparse(self)
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
      name='conv',
    )(x)
    return self.norm(name='norm')(x)


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
