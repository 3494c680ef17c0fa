"""The block-sparse Dense layer and the choice of its gather-matmul implementation.

Storage and math are in sift_jax.sparse_layers.block: params 'values' (C, K, bi, bo), sparsity
state 'rows' (C, K) int32 in the 'block_sparsity' collection.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sift_jax.sparse_layers import pallas_kernel
from sift_jax.sparse_layers.block import (
  check_dense_kernel,
  gather_blocks,
  gather_matmul_grads,
  gather_matmul_xla,
  grid,
)
from sift_jax.sparse_layers.masked import Initializer

BLOCK_COLLECTION = 'block_sparsity'
IMPLS = ('auto', 'xla', 'pallas', 'pallas_interpret')


def default_impl() -> str:
  """'pallas' on GPU and TPU backends, 'xla' elsewhere."""
  return 'pallas' if jax.default_backend() in ('gpu', 'tpu') else 'xla'


def block_matmul(x: jax.Array, values: jax.Array, rows: jax.Array, impl: str = 'auto') -> jax.Array:
  """x (..., D_in) times the block-sparse kernel (values (C, K, bi, bo), rows (C, K)).

  `impl`: 'xla' (a gather + GEMM per block-column), 'pallas' (the Pallas kernels of the platform
  it is lowered for: GPU / TPU; the XLA formulation on the CPU), 'pallas_interpret' (the GPU
  kernels interpreted, for CPU tests), 'auto' (pallas on GPU and TPU).
  """
  if impl not in IMPLS:
    raise ValueError(f'block-sparse impl {impl!r}; allowed: {", ".join(IMPLS)}')
  if impl == 'auto':
    impl = default_impl()
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])  # (N, D_in)
  if impl == 'xla':
    y = gather_matmul_xla(x2, values, rows)
  else:
    y = pallas_kernel.gather_matmul(x2, values, rows, interpret=impl == 'pallas_interpret')
  return y.reshape(*lead, y.shape[-1])  # (..., D_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def forward_prefix_matmul(
  x: jax.Array, values: jax.Array, rows: jax.Array, k: int, impl: str = 'auto'
) -> jax.Array:
  """Top-KAST's layer: the forward runs the first `k` stored blocks of each block-column (set
  A), the weight gradient covers all K stored blocks (set B) straight through.

  The output and dx are those of `block_matmul` over values[:, :k]; d values[:, j] is
  x[:, rows[:, j]]^T @ dy for every stored block, as if all were in the forward. FLOPs: forward
  and dx at A's density, the weight gradient at B's; nothing of the dense kernel's shape.
  """
  return block_matmul(x, values[:, :k], rows[:, :k], impl)


def _prefix_fwd(x, values, rows, k, impl):
  return forward_prefix_matmul(x, values, rows, k, impl), (x, values, rows)


def _prefix_bwd(k, impl, residuals, dy):
  x, values, rows = residuals
  x2 = x.reshape(-1, x.shape[-1])  # (N, D_in)
  dy2 = dy.reshape(x2.shape[0], -1)
  if (default_impl() if impl == 'auto' else impl) == 'xla':
    dx, dv = gather_matmul_grads(x2, values, rows, dy2, k_dx=k)
  else:  # the dx and dW kernels
    interpret = impl == 'pallas_interpret'
    dx, dv = pallas_kernel.gather_matmul_grads(x2, values, rows, dy2, k, interpret=interpret)
  return dx.reshape(x.shape), dv, None


forward_prefix_matmul.defvjp(_prefix_fwd, _prefix_bwd)


class BlockSparseDense(nn.Module):
  """A Dense layer whose kernel is stored as its K active blocks per (bi, bo) block-column.

  Params: 'values' (C, K, bi, bo) (and 'bias' (D_out,)); the 'block_sparsity' collection holds
  'rows' (C, K) int32. At init a dense kernel is drawn with `kernel_init` (so the weights have
  the masked layer's distribution), a balanced random pattern of `blocks_per_column` blocks is
  drawn, and the kernel's blocks there become the values.
  """

  features: int
  block: tuple[int, int]
  blocks_per_column: int
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1], self.features)
    check_dense_kernel(shape, self.block, self.name or 'BlockSparseDense')
    r, c = grid(shape, self.block)
    if not 1 <= self.blocks_per_column <= r:
      raise ValueError(f'blocks_per_column={self.blocks_per_column} is outside [1, {r}]')

    def init_rows() -> jax.Array:
      # A uniformly random set of K block-rows per column, ascending.
      bits = jax.random.bits(self.make_rng('params'), (c, r), jnp.uint32)  # (C, R)
      picked = jnp.argsort(bits, axis=1)[:, : self.blocks_per_column]
      return jnp.sort(picked, axis=1).astype(jnp.int32)  # (C, K)

    rows = self.variable(BLOCK_COLLECTION, 'rows', init_rows).value  # (C, K)

    def init_values(key: jax.Array) -> jax.Array:
      kernel = self.kernel_init(key, shape, self.param_dtype)  # (D_in, D_out)
      return gather_blocks(kernel, rows, self.block)

    values = self.param('values', init_values)  # (C, K, bi, bo)
    y = block_matmul(x.astype(self.dtype), values.astype(self.dtype), rows, self.impl)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y  # (..., features)
