"""A Pallas kernel for the block-sparse gather-matmul (GPU and TPU backends).

One program per (block-column c, token tile j) accumulates, over the K active blocks of column c,
values[c, k]^T @ xt[rows[c, k] * bi : (rows[c, k] + 1) * bi, tile j] into a (bo, tn) tile of
the feature-major output: the gather is a dynamic slice of the input inside the kernel, so no
gathered copy of the activations is written to memory. The backward pass is the XLA formulation
(`block.gather_matmul_grads`: a loop over the block-columns, GEMMs into d values and into dx's
block-rows).

Selected automatically on GPU and TPU (sift_jax.sparse_layers.block_dense.default_impl). Tested for
correctness on the CPU in interpret mode only: it has not been compiled or timed on a GPU or TPU
here, so tile sizes and the Triton / Mosaic lowering of the dynamic slice are unmeasured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sift_jax.sparse_layers.block import gather_matmul_grads

TOKEN_TILE = 128  # tokens per program; N is padded up to a multiple


def _kernel(rows_ref, values_ref, xt_ref, out_ref, *, k: int, bi: int) -> None:
  c = pl.program_id(0)

  def accumulate(i, acc):
    start = pl.multiple_of(rows_ref[c, i] * bi, bi)
    xb = xt_ref[pl.ds(start, bi), :]  # (bi, tn)
    w = values_ref[i]  # (bi, bo)
    return acc + jax.lax.dot_general(
      w, xb, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )  # (bo, tn)

  bo, tn = out_ref.shape
  acc = jax.lax.fori_loop(0, k, accumulate, jnp.zeros((bo, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _forward(x: jax.Array, values: jax.Array, rows: jax.Array, interpret: bool) -> jax.Array:
  n, d_in = x.shape
  c, k, bi, bo = values.shape
  tn = min(TOKEN_TILE, n)
  padded = -(-n // tn) * tn
  xt = jnp.pad(x, ((0, padded - n), (0, 0))).T  # (D_in, N')
  yt = pl.pallas_call(
    functools.partial(_kernel, k=k, bi=bi),
    out_shape=jax.ShapeDtypeStruct((c * bo, padded), x.dtype),
    grid=(c, padded // tn),
    in_specs=[
      pl.BlockSpec(rows.shape, lambda i, j: (0, 0)),
      pl.BlockSpec((None, k, bi, bo), lambda i, j: (i, 0, 0, 0)),
      pl.BlockSpec((d_in, tn), lambda i, j: (0, j)),
    ],
    out_specs=pl.BlockSpec((bo, tn), lambda i, j: (i, j)),
    interpret=interpret,
  )(rows, values, xt)  # (D_out, N')
  return yt[:, :n].T  # (N, D_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_matmul(x, values, rows, interpret):
  return _forward(x, values, rows, interpret)


def _fwd(x, values, rows, interpret):
  return _forward(x, values, rows, interpret), (x, values, rows)


def _bwd(interpret, res, g):
  del interpret
  x, values, rows = res
  return (*gather_matmul_grads(x, values, rows, g), None)


_gather_matmul.defvjp(_fwd, _bwd)


def gather_matmul(
  x: jax.Array, values: jax.Array, rows: jax.Array, interpret: bool = False
) -> jax.Array:
  """x (N, D_in) -> (N, C * bo) through the Pallas kernel; `interpret` runs it on any backend."""
  return _gather_matmul(x, values, rows.astype(jnp.int32), interpret)
