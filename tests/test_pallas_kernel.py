"""The block-sparse Pallas kernels: interpret mode against the XLA formulation, and lowering.

Both kernel families (TPU: scalar-prefetch grids over the active blocks; GPU: Triton programs
looping over them) run interpreted on the CPU and must equal `block.gather_matmul_xla` and
`block.gather_matmul_grads` in the forward pass, dx (all K blocks, and Top-KAST's first k_dx)
and d values. Lowering: `jax.export` for cuda and tpu at the GPT-3 Small Sparse Wide layers (one
in the default run, the whole grid with -m slow).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax.sparse_layers import block, block_dense, pallas_kernel

FAMILIES = pallas_kernel.FAMILIES


def layer(d_in, d_out, blk, k, n, dtype, seed=0, rows=None):
  """x (N, D_in), values (C, K, bi, bo), rows (C, K) (random distinct per column unless
  given), dy (N, D_out)."""
  bi, bo = blk
  r, c = d_in // bi, d_out // bo
  rng = np.random.default_rng(seed)
  if rows is None:
    rows = np.stack([rng.permutation(r)[:k] for _ in range(c)])
  values = rng.normal(size=(c, k, bi, bo)) / np.sqrt(k * bi)
  x = rng.normal(size=(n, d_in))
  dy = rng.normal(size=(n, d_out))
  as_ = lambda a: jnp.asarray(a, dtype)
  return as_(x), as_(values), jnp.asarray(rows, jnp.int32), as_(dy)


@jax.jit
def xla_reference(x, values, rows, dy):
  y = block.gather_matmul_xla(x, values, rows)
  dx, dv = block.gather_matmul_grads(x, values, rows, dy)
  return y, dx, dv


def kernel_outputs(family, x, values, rows, dy, k_dx):
  """(y, dx, d values) through the custom VJP, and (dx, d values) with dx over k_dx blocks."""

  @jax.jit
  def run(x, values, rows, dy):
    y, vjp = jax.vjp(lambda x, v: pallas_kernel.gather_matmul(x, v, rows, family), x, values)
    prefix = pallas_kernel.gather_matmul_grads(x, values, rows, dy, k_dx, interpret=family)
    return (y, *vjp(dy)), prefix

  return run(x, values, rows, dy)


def assert_close(got, want, dtype, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, what
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))
  else:  # bf16: the kernels accumulate in f32 and round once, the XLA loop rounds per column
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * scale, err_msg=what)


def check(family, d_in, d_out, blk, k, n, dtype, rows=None, k_dx=None, seed=0):
  x, values, rows, dy = layer(d_in, d_out, blk, k, n, dtype, seed, rows)
  t = pallas_kernel.tiles(family, n, (d_in, d_out), blk, dtype)
  assert t.family == family, t.why  # the kernels run, not the XLA fallback
  k_dx = k - 1 if k_dx is None else k_dx
  (y, dx, dv), (dx_a, dv_a) = kernel_outputs(family, x, values, rows, dy, k_dx)
  y0, dx0, dv0 = xla_reference(x, values, rows, dy)
  dx0_a, dv0_a = block.gather_matmul_grads(x, values, rows, dy, k_dx)
  for got, want, what in (
    (y, y0, 'y'),
    (dx, dx0, 'dx'),
    (dv, dv0, 'd values'),
    (dx_a, dx0_a, f'dx over the first {k_dx} blocks'),
    (dv_a, dv0_a, 'd values with dx over a prefix'),
  ):
    assert got.dtype == want.dtype, what
    assert_close(got, want, dtype, f'{family} {what}')


# Block-rows 0 and 5 are in every column (ties: several blocks add into one dx row), 1 and 4 in
# none (their dx is zero); rows unsorted within a column; K = 3 (odd); N = 200 (padded to tiles).
SHARED_ROWS = np.array([[5, 0, 2], [2, 5, 0], [3, 0, 5]])


@pytest.mark.parametrize('family', FAMILIES)
def test_f32_equals_xla_with_shared_unused_and_unsorted_rows(family):
  # (64, 128) blocks: non-square; on the TPU two block-rows share a 128-lane tile.
  check(family, 384, 384, (64, 128), 3, 200, jnp.float32, rows=SHARED_ROWS)


@pytest.mark.parametrize('family', FAMILIES)
def test_bf16_equals_xla_loosely(family):
  # (128, 64) blocks: on the TPU two block-columns share a 128-lane output tile; K = 3 of R = 4.
  check(family, 512, 256, (128, 64), 3, 130, jnp.bfloat16, seed=1)


SLOW_CASES = [
  # (d_in, d_out, block, K, N, dtype)
  (256, 384, (64, 64), 3, 200, jnp.float32),
  (256, 384, (64, 64), 1, 64, jnp.bfloat16),
  (512, 256, (128, 128), 3, 300, jnp.float32),
  (512, 256, (128, 128), 4, 256, jnp.bfloat16),  # K = R: dense
  (768, 256, (128, 128), 5, 17, jnp.float32),  # N under one tile
]


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('case', SLOW_CASES, ids=str)
def test_more_shapes_equal_xla(family, case):
  d_in, d_out, blk, k, n, dtype = case
  check(family, d_in, d_out, blk, k, n, dtype, k_dx=max(1, k - 2), seed=k)


@pytest.mark.slow
def test_gpu_small_blocks_and_tpu_quarter_lane_blocks():
  check('gpu', 64, 96, (16, 32), 3, 40, jnp.float32)  # the smallest Triton tiles
  check('tpu', 256, 256, (32, 128), 5, 40, jnp.float32)  # four block-rows per 128 lanes


def test_tiles_and_fallbacks():
  t = pallas_kernel.tpu_tiles(16384, (1536, 6144), (128, 128), jnp.bfloat16)
  assert (t.family, t.tn, t.gi, t.go) == ('tpu', 2048, 1, 1)
  t = pallas_kernel.tpu_tiles(16384, (6144, 1536), (64, 64), jnp.bfloat16)
  assert (t.family, t.gi, t.go) == ('tpu', 2, 2)
  assert pallas_kernel.tpu_tiles(200, (384, 384), (64, 128), jnp.float32).tn == 256  # divides 256
  assert pallas_kernel.tpu_tiles(16384, (1536, 1536), (32, 32), jnp.bfloat16).family == 'xla'  # 16x
  assert pallas_kernel.tpu_tiles(16384, (1536, 1536), (96, 128), jnp.bfloat16).family == 'xla'
  # 3 block-columns of 64 cannot pair up into 128-lane tiles
  assert pallas_kernel.tpu_tiles(16384, (1536, 192), (64, 64), jnp.bfloat16).family == 'xla'
  g = pallas_kernel.gpu_tiles(16384, (128, 128), jnp.bfloat16)
  assert (g.family, g.tn, g.tk, g.num_warps, g.num_stages) == ('gpu', 128, 64, 8, 3)
  assert g.num_stages * 2 * (128 * 64 * 2) <= pallas_kernel.GPU_SMEM_BUDGET  # pipeline buffers
  assert pallas_kernel.gpu_tiles(16384, (4, 6), jnp.float32).family == 'xla'
  assert pallas_kernel.kernel_family('cpu', 8, (16, 16), (4, 4), jnp.float32).family == 'xla'
  assert pallas_kernel.kernel_family('cuda', 8, (64, 64), (16, 16), jnp.float32).family == 'gpu'
  for t in (pallas_kernel.tpu_tiles(10, (96, 128), (96, 128), jnp.float32), g):
    assert t.why
  # An unsupported shape runs the XLA formulation in interpret mode too.
  x, values, rows, dy = layer(24, 30, (4, 6), 2, 7, jnp.float32)
  y = pallas_kernel.gather_matmul(x, values, rows, interpret='tpu')
  np.testing.assert_allclose(y, block.gather_matmul_xla(x, values, rows), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="interpret='mosaic'; allowed"):
    pallas_kernel.gather_matmul(x, values, rows, interpret='mosaic')


def test_compiled_on_cpu_is_the_xla_formulation_and_top_kast_backward_uses_the_kernels():
  x, values, rows, dy = layer(256, 256, (64, 64), 3, 20, jnp.float32)
  want = xla_reference(x, values, rows, dy)
  y, vjp = jax.vjp(lambda x, v: pallas_kernel.gather_matmul(x, v, rows), x, values)
  for got, ref in zip((y, *vjp(dy)), want, strict=True):
    np.testing.assert_array_equal(got, ref)  # the same XLA program on the CPU

  # Top-KAST's layer (forward on the first k, dW on all K) through the interpreted kernels.
  @jax.jit
  def top_kast(x, values, rows, dy):
    outs = []
    for impl in ('xla', 'pallas_interpret'):
      f = lambda x, v, impl=impl: block_dense.forward_prefix_matmul(x, v, rows, 2, impl)
      y, vjp = jax.vjp(f, x, values)
      outs.append((y, *vjp(dy)))
    return outs

  want, got = top_kast(x, values, rows, dy)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----- lowering through jax.export (Triton for cuda, Mosaic for tpu)

KERNEL_CALL = re.compile(r'custom_call @(tpu_custom_call|__gpu\$xla\.gpu\.triton)')
TOKENS = 8 * 2048  # batch 8 x context 2048


def export_layer(platform, d_in, d_out, b, sparsity, dtype=jnp.bfloat16):
  """Exports forward + backward of one block-sparse layer; returns (kernel calls, K)."""
  r, c = d_in // b, d_out // b
  k = max(1, round((1 - sparsity) * r))  # the balanced plan's active blocks per column

  def fwd_bwd(x, values, rows, dy):
    y, vjp = jax.vjp(lambda x, v: pallas_kernel.gather_matmul(x, v, rows), x, values)
    return y, *vjp(dy)

  s = jax.ShapeDtypeStruct
  args = (s((TOKENS, d_in), dtype), s((c, k, b, b), dtype), s((c, k), jnp.int32))
  exported = jax.export.export(
    jax.jit(fwd_bwd), platforms=[platform], disabled_checks=pallas_kernel.EXPORT_DISABLED_CHECKS
  )(*args, s((TOKENS, d_out), dtype))
  text = exported.mlir_module()
  calls = KERNEL_CALL.findall(text)
  assert 'stablehlo.while' not in text  # no XLA loop over the columns: the kernels do it all
  assert set(calls) == {'tpu_custom_call' if platform == 'tpu' else '__gpu$xla.gpu.triton'}
  return len(calls), k


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_sparse_wide_layer_lowers_for_cuda_and_tpu(platform):
  """GPT-3 Small Sparse Wide's up-projection, s = 0.75, 128 x 128 blocks, bf16: three kernels
  (forward, dx, dW). The old kernel failed here on cuda: shared memory 525,320 > 232,448."""
  assert export_layer(platform, 1536, 6144, 128, 0.75) == (3, 3)


PAPER_GRID = [
  (platform, d_in, d_out, b, s)
  for platform in ('cuda', 'tpu')
  for d_in, d_out in ((1536, 6144), (6144, 1536))
  for b in (64, 128)
  for s in (0.5, 0.75, 0.9)
]


@pytest.mark.slow
@pytest.mark.parametrize('platform,d_in,d_out,b,sparsity', PAPER_GRID)
def test_paper_grid_lowers(platform, d_in, d_out, b, sparsity):
  assert export_layer(platform, d_in, d_out, b, sparsity)[0] == 3
