"""Block-sparse Dense execution: only the active blocks of a balanced block mask are stored.

A (D_in, D_out) kernel tiled by (bi, bo) blocks is a grid of R = D_in / bi block-rows and
C = D_out / bo block-columns. A balanced mask keeps the same number K of active blocks in every
block-column, so the active weights fit one dense array and the matmul is, per block-column, a
gather of K input slices and one GEMM:

  values (C, K, bi, bo)   the active blocks (trained parameters; optimizer state only for these)
  rows   (C, K) int32     the block-row of each active block (sparsity state beside the params)

  y[:, c] = sum_k x[:, rows[c, k]] @ values[c, k]

On the CPU (XLA) the product is a loop over the C block-columns (`gather_matmul_xla`): column c
copies its K block-rows of the transposed input x^T (contiguous (bi, N) rows) into one (K bi, N)
operand and runs one GEMM into its bo output columns, which stay token-major (N, D_out), like the
layer's input and output. The backward pass is a custom VJP with the same loop: it regathers the
column's input (the gathered copy, (1-s) D_out / bo times the input, is never stored whole nor
kept for the backward: the residual is x^T), forms d values[c] = x_c^T dy_c and adds
dy_c values[c]^T into dx's block-rows in place. Blocks of 64-128 are the target range.
A new pattern with the same K is just a new `rows` array: nothing is retraced or recompiled.

This module holds the math and the conversions between masked (dense kernel + mask) and
block-sparse state; the layer and the choice of implementation (XLA here, or the Pallas kernel
on GPU / TPU) are in sift_jax.sparse_layers.block_dense.

Only Dense (2-D) kernels run block-sparse; convolutions stay masked (`check_dense_kernel`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_dense_kernel(shape: tuple[int, ...], block: tuple[int, int], name: str) -> None:
  """Raises ValueError unless `shape` is a 2-D kernel that (bi, bo) blocks tile."""
  if len(shape) != 2:
    raise ValueError(
      f'block_sparse execution runs Dense (2-D) kernels only; {name} has shape {shape} '
      '(convolutions, 1x1 and 3x3 included, are unsupported: use sparsity.execution=masked)'
    )
  if len(block) != 2 or min(block) < 1 or shape[0] % block[0] or shape[1] % block[1]:
    raise ValueError(f'block_shape {block} does not tile the kernel {name} {shape}')


def grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
  """(R, C): block-rows and block-columns of a (D_in, D_out) kernel."""
  return shape[0] // block[0], shape[1] // block[1]


def _col_index(rows: jax.Array) -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.int32, rows.shape, 0)  # (C, K): the column of each block


def to_masked(
  values: jax.Array, rows: jax.Array, shape: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
  """(values (C, K, bi, bo), rows (C, K)) -> (dense kernel (D_in, D_out), bool mask)."""
  _, _, bi, bo = values.shape
  r, c = grid(shape, (bi, bo))
  kernel = jnp.zeros((r, c, bi, bo), values.dtype).at[rows, _col_index(rows)].set(values)
  return kernel.transpose(0, 2, 1, 3).reshape(shape), rows_mask(rows, shape, (bi, bo))


def rows_mask(rows: jax.Array, shape: tuple[int, int], block: tuple[int, int]) -> jax.Array:
  """The bool (D_in, D_out) mask of the blocks at block-rows `rows` (C, K)."""
  r, c = grid(shape, block)
  mask = jnp.zeros((r, c), bool).at[rows, _col_index(rows)].set(True)  # (R, C)
  return jnp.repeat(jnp.repeat(mask, block[0], axis=0), block[1], axis=1)


def from_masked(
  kernel: jax.Array,
  mask: jax.Array,
  block: tuple[int, int],
  k: int,
  first: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(dense kernel, balanced mask with k active blocks per block-column) -> (values, rows).

  Rows come out ascending within each column, those of the blocks of mask `first` (a subset)
  before the others. `k` is static (it fixes the shapes); under jit the mask is trusted to be
  balanced, `check_balanced` verifies a concrete one.
  """
  bi, bo = block
  r, c = grid(kernel.shape, block)
  blocks_any = lambda m: m.reshape(r, bi, c, bo).any(axis=(1, 3))  # (R, C)
  order = 2 * (~blocks_any(mask)).astype(jnp.int32)  # (R, C): 0 active, 2 inactive
  if first is not None:
    order = order + (~blocks_any(first)).astype(jnp.int32)
  rows = jnp.argsort(order, axis=0, stable=True)[:k].T.astype(jnp.int32)  # (C, K)
  return gather_blocks(kernel, rows, block), rows


def gather_blocks(kernel: jax.Array, rows: jax.Array, block: tuple[int, int]) -> jax.Array:
  """The (C, K, bi, bo) blocks of a dense (D_in, D_out) kernel at block-rows `rows` (C, K)."""
  bi, bo = block
  r, c = grid(kernel.shape, block)
  blocks = kernel.reshape(r, bi, c, bo).transpose(0, 2, 1, 3)  # (R, C, bi, bo)
  return blocks[rows, _col_index(rows)]


def check_balanced(mask: Any, block: tuple[int, int]) -> int:
  """K, the active blocks per block-column of a concrete mask; ValueError if it is unbalanced
  or has partial blocks."""
  m = np.asarray(mask)
  bi, bo = block
  r, c = grid(m.shape, block)
  g = m.reshape(r, bi, c, bo).transpose(0, 2, 1, 3)  # (R, C, bi, bo)
  whole = g.all(axis=(2, 3))
  if (g.any(axis=(2, 3)) != whole).any():
    raise ValueError(f'mask has partially active {block} blocks')
  counts = whole.sum(axis=0)  # (C,)
  if (counts != counts[0]).any():
    raise ValueError(
      f'mask is not balanced: active blocks per block-column range {counts.min()}..{counts.max()}'
    )
  return int(counts[0])


def _input_blocks(xt: jax.Array, rows_c: jax.Array, bi: int) -> jax.Array:
  """(K bi, N): the block-rows rows_c (K,) of the feature-major input xt (D_in, N), stacked."""
  k = rows_c.shape[0]
  return jnp.concatenate([jax.lax.dynamic_slice_in_dim(xt, rows_c[j] * bi, bi) for j in range(k)])


def _columns(values: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What the loops scan: (column index (C,), rows (C, K), values (C, K bi, bo))."""
  c, k, bi, bo = values.shape
  return jnp.arange(c), rows, values.reshape(c, k * bi, bo)


def _forward(xt: jax.Array, values: jax.Array, rows: jax.Array) -> jax.Array:
  """xt (D_in, N) -> y (N, C * bo)."""
  n = xt.shape[1]
  c, _, bi, bo = values.shape

  def column(y3, inp):
    i, rows_c, w = inp  # (), (K,), (K bi, bo)
    g = _input_blocks(xt, rows_c, bi)  # (K bi, N)
    y_c = jax.lax.dot_general(g, w, (((0,), (0,)), ((), ())))  # (N, bo)
    return jax.lax.dynamic_update_index_in_dim(y3, y_c, i, 1), None

  y3 = jax.lax.scan(column, jnp.zeros((n, c, bo), xt.dtype), _columns(values, rows))[0]
  return y3.reshape(n, c * bo)  # (N, C, bo) -> (N, D_out)


def _grads(
  xt: jax.Array, values: jax.Array, rows: jax.Array, dy: jax.Array, k_dx: int
) -> tuple[jax.Array, jax.Array]:
  """(dx (N, D_in), d values (C, K, bi, bo)) from xt (D_in, N) and dy (N, C * bo)."""
  n = xt.shape[1]
  _, _, bi, bo = values.shape

  def column(dx, inp):
    i, rows_c, w = inp  # (), (K,), (K bi, bo)
    g = _input_blocks(xt, rows_c, bi)  # (K bi, N): regathered, not kept from the forward pass
    dy_c = jax.lax.dynamic_slice_in_dim(dy, i * bo, bo, axis=1)  # (N, bo)
    dw = g @ dy_c  # (K bi, bo)
    dg = jax.lax.dot_general(dy_c, w[: k_dx * bi], (((1,), (1,)), ((), ())))  # (N, k_dx bi)
    for j in range(k_dx):
      start = rows_c[j] * bi
      acc = jax.lax.dynamic_slice_in_dim(dx, start, bi, axis=1) + dg[:, j * bi : (j + 1) * bi]
      dx = jax.lax.dynamic_update_slice_in_dim(dx, acc, start, axis=1)  # (N, D_in)
    return dx, dw

  dx0 = jnp.zeros((n, xt.shape[0]), xt.dtype)
  dx, dw = jax.lax.scan(column, dx0, _columns(values, rows))  # (N, D_in), (C, K bi, bo)
  return dx, dw.reshape(values.shape)


@jax.custom_vjp
def gather_matmul_xla(x: jax.Array, values: jax.Array, rows: jax.Array) -> jax.Array:
  """x (N, D_in) -> (N, C * bo): a loop over the block-columns, one gather + GEMM each.

  Column c gathers its K block-rows of the transposed input (contiguous (bi, N) slices) into
  (K bi, N) and multiplies it with values[c] into the output's columns c * bo: (N, bo). The
  backward pass (`gather_matmul_grads`) loops over the columns again; the residual is x^T.
  """
  return _forward(x.T, values, rows)


def gather_matmul_grads(
  x: jax.Array, values: jax.Array, rows: jax.Array, dy: jax.Array, k_dx: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """(dx, d values) of `gather_matmul_xla` at x for the output gradient dy (N, C * bo).

  d values covers all K blocks of each block-column (x_c^T dy_c); dx flows through the first
  `k_dx` of them (all by default; Top-KAST's forward set A), added into its block-rows.
  """
  return _grads(x.T, values, rows, dy, values.shape[1] if k_dx is None else k_dx)


def _gather_matmul_fwd(x, values, rows):
  xt = x.T  # (D_in, N)
  return _forward(xt, values, rows), (xt, values, rows)


def _gather_matmul_bwd(residuals, dy):
  xt, values, rows = residuals
  return (*_grads(xt, values, rows, dy, values.shape[1]), None)


gather_matmul_xla.defvjp(_gather_matmul_fwd, _gather_matmul_bwd)
