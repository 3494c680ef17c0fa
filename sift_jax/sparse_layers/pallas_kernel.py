"""Pallas kernels for the block-sparse gather-matmul, its input gradient and its weight gradient.

The product is y[:, c] = sum_k x[:, rows[c, k]] @ values[c, k] (`sparse_layers.block`: values
(C, K, bi, bo), rows (C, K), K active block-rows in every block-column). Everything stays
token-major: x (N, D_in), y and dy (N, D_out), dx (N, D_in); nothing is transposed in XLA.

One kernel family per backend, picked per platform at lowering time (`jax.lax.platform_dependent`:
exporting or compiling for cuda runs the GPU branch, for tpu the TPU branch, the CPU runs the XLA
formulation `block.gather_matmul_xla`):

TPU (Mosaic): the standard block-sparse matmul, the grid steps over the active blocks.
  forward  grid (column c, token tile j, k); the block-rows are scalar prefetch (SMEM), so the
           index map of x picks tile (j, rows[c, k]): each step DMAs one (tn, bi) input tile and
           one (bi, bo) weight block into VMEM and adds their product into a (tn, bo) f32 VMEM
           scratch tile, written to y at the last k.
  dx       the transposed plan: the C K blocks sorted by block-row, with one extra 'init' step
           per block-row (so empty rows get zeros and each row's tile starts at 0), prefetched as
           (row, column, k, flags) per step; grid (token tile j, step p); each step adds
           dy[j, col[p]] @ values[col[p], k[p]]^T into the row's f32 tile, written at the row's
           last step (the grouped-matmul pattern of jax's megablox kernels).
  dW       grid (column c, k, token tile j): values' gradient only at the active blocks,
           x[j, rows[c, k]]^T @ dy[j, c] summed over j in an f32 tile (x's tile is transposed in
           f32 before the MXU, as megablox's tgmm does).
  Mosaic tiles the last two dims of every block by (8, 128), so a block dim under 128 (64) is
  padded: g = 128 / b consecutive block-rows (or -columns) form one 128-wide tile and each
  block becomes a zero-padded (128, 128) block at its offset (built in XLA from the weights:
  cheap, weights-sized; the MXU passes are the same, the weight DMA is 2-4x). Supported: block
  dims that divide 128 or are multiples of it, padding at most 4x (64 x 64, 32 x 128, ...),
  kernel dims that the padded blocks tile; other shapes run the XLA formulation. The prefetched
  plan is at most ~20 KB of SMEM at the paper shapes (1 MiB on v4 and later; v2 / v3 have
  16 KiB). Expected limit, unmeasured: every step reads its x tile from HBM, so the forward does
  bo flops per byte of x (128 for 128-blocks) and dW 64, under the ~240 a v5e needs to keep its
  MXU busy; holding a token tile of x in VMEM across a column sweep would be the next step.
  Scoped VMEM: at most 8 MiB per kernel (`tpu_tiles`).

GPU (Triton): Pallas' Mosaic GPU backend (jax's default for pallas_call on cuda in 0.10) takes
  no scalar prefetch and would stage whole BlockSpec blocks in shared memory (the old kernel's
  (D_in, tn) column overflowed it: 525,320 > 232,448 bytes at 1536 x 6144), so the kernels are
  Triton (explicit `triton.CompilerParams`), where refs are global-memory pointers and each load
  is one tile: a program per (column c, token tile j) loops over its K blocks (block-rows read
  from the rows array), loading (tn, tk) input tiles and (tk, bo) weight slices (Triton's
  software pipeline, num_stages deep, overlaps the loads) into an f32 register accumulator; dx
  is a program per (block-row r, token tile j) looping over that row's blocks (CSR of the
  transposed plan: a dynamic trip count), dW a program per (active block, token split) looping
  over token chunks, the splits summed in XLA. Every loop step is one tl.dot on a tk-chunk (block
  k's slice i % nb at step i), so each step's loads are one pipeline stage. Supported: block dims
  in {16, 32, 64, 128} (Triton tiles are powers of two, tl.dot needs >= 16); others run the XLA
  formulation. Programs with consecutive ids share x's token tile (forward) or dy's column (dW),
  so repeated reads mostly hit L2. f32 inputs multiply in full f32 (Triton's IEEE mode, not TF32).

Tiles (`tiles`): see `tpu_tiles` and `gpu_tiles`, each returns its reason.

Backward: a custom VJP whose backward runs the dx and dW kernels above (k_dx < K, Top-KAST's
forward set A, runs dx over the first k_dx blocks only).

Lowering: `jax.export` from this CPU lowers the kernels for cuda (Triton IR; the export needs
`EXPORT_DISABLED_CHECKS`, since jax does not guarantee the Triton custom call's compatibility)
and for tpu (Mosaic), one platform per export (a multi-platform export would lower each branch
for every platform and fails). tests/test_pallas_kernel.py lowers the GPT-3 Small Sparse Wide
layers (1536 <-> 6144, s = 0.5 / 0.75 / 0.9, blocks 64 and 128, bf16, 16,384 tokens) for both.
Export stops at Pallas' own lowering: Mosaic's TPU compile runs on the device, so VMEM fit is by
the arithmetic in `tpu_tiles`. The Triton IR it emits was also compiled offline (not in the
tests) with the `triton` 3.9 package to cubins for sm_90 and sm_80 at all those shapes, fwd / dx /
dW, bf16, 3 stages: on sm_90 128-blocks use 64 / 64 / 96 KiB of shared memory and 154-181
registers at 8 warps, 64-blocks 48 KiB and 79-156 registers at 4 warps, no spills; sm_80 builds
too (at most 255 registers, no local-memory spills). jaxlib bundles its own Triton, which may
differ. Nothing here has run or been timed on a GPU or TPU: unmeasured.

Sharding: the kernels are custom calls that XLA cannot partition (they are not wrapped in
shard_map), so under a device mesh expect XLA to replicate their operands.

Correctness: interpret mode (`interpret='tpu'` / `'gpu'`) runs either family's kernels on the
CPU; the tests check them against the XLA formulation (forward, dx, dW; f32 tight, bf16 loose).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from sift_jax.sparse_layers import block

FAMILIES = ('tpu', 'gpu')
# jax.export refuses custom calls without a compatibility guarantee; Triton's is one of them.
EXPORT_DISABLED_CHECKS = (jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton'),)

TPU_LANES = 128  # Mosaic's lane width: the last dim of a block is a multiple of it
TPU_VMEM_BUDGET = 8 * 2**20  # of the 16 MiB scoped VMEM default (v5e; 32 MiB on v6e)
GPU_SMEM_BUDGET = 128 * 2**10  # pipeline buffers; A100 has 164 KiB per SM, H100 227 KiB
GPU_BLOCKS = (16, 32, 64, 128)
GPU_DW_PROGRAMS = 256  # dW programs to aim for: about two waves on an H100's 132 SMs


@dataclasses.dataclass(frozen=True)
class Tiles:
  """How one layer shape runs on one kernel family ('tpu', 'gpu', or 'xla' when unsupported)."""

  family: str
  why: str
  tn: int = 0  # tokens per tile (N is zero-padded to a multiple)
  gi: int = 1  # TPU: block-rows per 128-lane tile (bi < 128)
  go: int = 1  # TPU: block-columns per 128-lane tile (bo < 128)
  tk: int = 0  # GPU: contraction chunk per tl.dot (features in fwd / dx, tokens in dW)
  num_warps: int = 0
  num_stages: int = 0


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _lane_group(b: int) -> int | None:
  """Blocks of size b per 128-lane tile (1 for multiples of 128), None if b fits neither way."""
  if b % TPU_LANES == 0:
    return 1
  return TPU_LANES // b if TPU_LANES % b == 0 else None


def tpu_tiles(n: int, shape: tuple[int, int], block: tuple[int, int], dtype: Any) -> Tiles:
  """TPU tiles for N tokens, a (D_in, D_out) kernel and (bi, bo) blocks.

  Token tile: the largest of 2048 (16-bit) / 1024 (f32), 1024, ..., 128 that divides N rounded up
  to 128 and keeps the double-buffered blocks plus f32 tiles under 8 MiB of VMEM. Why large: a
  grid step costs ~0.35 us and a (2048, 128) x (128, 128) bf16 step is ~0.34 us of MXU work on a
  v5e; why 128-multiples: the dW kernel transposes the (tn, bi) tile, making tn the lane dim.
  """
  bi, bo = block
  gi, go = _lane_group(bi), _lane_group(bo)
  if gi is None or go is None:
    return Tiles('xla', f'block {block}: Mosaic needs block dims that divide 128 or are multiples')
  if gi * go > 4:
    return Tiles('xla', f'block {block}: padding to 128 lanes would grow the weights {gi * go}x')
  if shape[0] % (gi * bi) or shape[1] % (go * bo):
    return Tiles('xla', f'kernel {shape} is not tiled by the padded blocks ({gi * bi}, {go * bo})')
  bi_, bo_ = gi * bi, go * bo
  size = jnp.dtype(dtype).itemsize
  padded = _round_up(n, 128)

  def vmem(tn: int) -> int:  # double-buffered in / out blocks, f32 accumulator and transposed x
    return 2 * size * (tn * bi_ + bi_ * bo_ + tn * max(bi_, bo_)) + 4 * tn * (bi_ + bo_)

  cap = 2048 if size <= 2 else 1024
  tn = next(
    (
      t
      for t in (2048, 1024, 512, 256)
      if t <= cap and padded % t == 0 and vmem(t) <= TPU_VMEM_BUDGET
    ),
    128,
  )
  return Tiles(
    'tpu',
    f'tn={tn}: largest of {cap}..128 dividing N={padded} within {TPU_VMEM_BUDGET >> 20} MiB VMEM '
    f'({vmem(tn) >> 10} KiB); blocks padded to ({bi_}, {bo_})',
    tn=tn,
    gi=gi,
    go=go,
  )


def gpu_tiles(n: int, block: tuple[int, int], dtype: Any) -> Tiles:
  """GPU (Triton) tiles for N tokens and (bi, bo) blocks.

  tn = 128 tokens (under 128: the next power of two, at least 16), tk = 64 (16-bit) / 32 (f32)
  contraction chunk: the classic 128 x 128 x 64 Triton matmul tile; 8 warps for a 128 x 128 f32 accumulator
  (64 KiB of registers), else 4; pipeline stages as many as fit 128 KiB of shared memory, at most
  3 (3 x 32 KiB for bf16 128-blocks, under an A100's 164 KiB and an H100's 227 KiB).
  """
  bi, bo = block
  if bi not in GPU_BLOCKS or bo not in GPU_BLOCKS:
    return Tiles('xla', f'block {block}: the Triton kernels take block dims in {GPU_BLOCKS}')
  size = jnp.dtype(dtype).itemsize
  tn = min(128, max(16, 1 << max(0, (n - 1).bit_length())))
  tk = 64 if size <= 2 else 32
  # Shared memory per stage: fwd (tn, tk) + (tk, bo); dx (tn, tk) + (bi, tk); dW (tk, bi) + (tk, bo).
  stage = size * max(tn * tk + tk * bo, tn * tk + bi * tk, tk * (bi + bo))
  stages = max(1, min(3, GPU_SMEM_BUDGET // stage))
  warps = 8 if tn * max(bi, bo) >= 128 * 128 or bi * bo >= 128 * 128 else 4
  return Tiles(
    'gpu',
    f'tn={tn}, tk={tk}: 128 x 128 x 64-style Triton tiles; {stages} stages x {stage >> 10} KiB '
    f'shared memory; {warps} warps',
    tn=tn,
    tk=tk,
    num_warps=warps,
    num_stages=stages,
  )


def tiles(family: str, n: int, shape: tuple[int, int], block: tuple[int, int], dtype: Any) -> Tiles:
  """The tiles of `family` ('tpu' or 'gpu') for N tokens through a (D_in, D_out) kernel of
  (bi, bo) blocks, or family 'xla' with the reason."""
  if family == 'tpu':
    return tpu_tiles(n, shape, block, dtype)
  if family == 'gpu':
    return gpu_tiles(n, block, dtype)
  raise ValueError(f'kernel family {family!r}; allowed: {", ".join(FAMILIES)}')


def _pad_tokens(a: jax.Array, n: int) -> jax.Array:
  return a if a.shape[0] == n else jnp.pad(a, ((0, n - a.shape[0]), (0, 0)))


# ----- TPU (Mosaic): grids over the active blocks, block-rows as scalar prefetch


def _tpu_pack(values: jax.Array, rows: jax.Array, gi: int, go: int):
  """(values (C, K, bi, bo), rows (C, K)) -> blocks padded to 128 lanes (C/go, go K, gi bi, go bo)
  and their 128-lane block-rows (C/go, go K): entry t K + k of padded column m is block k of
  column m go + t, placed at row offset (rows % gi) bi and column offset t bo, zeros elsewhere."""
  c, k, bi, bo = values.shape
  cs = c // go
  r3 = rows.reshape(cs, go, k)
  srows = (r3 // gi).reshape(cs, go * k)
  if gi == go == 1:
    return values, srows
  mask = _pack_mask(r3, gi, go)
  v = values.reshape(cs, go, k, 1, bi, 1, bo)
  padded = jnp.where(mask, v, jnp.zeros((), values.dtype))  # (Cs, go, K, gi, bi, go, bo)
  return padded.reshape(cs, go * k, gi * bi, go * bo), srows


def _pack_mask(r3: jax.Array, gi: int, go: int) -> jax.Array:
  """(Cs, go, K, gi, 1, go, 1): where in its padded block each block sits."""
  at_row = (r3 % gi)[..., None] == jnp.arange(gi)  # (Cs, go, K, gi)
  at_col = jnp.eye(go, dtype=bool)  # (go, go)
  return at_row[:, :, :, :, None, None, None] & at_col[None, :, None, None, None, :, None]


def _tpu_unpack(d_padded: jax.Array, rows: jax.Array, gi: int, go: int, block: tuple[int, int]):
  """The gradient of each block, cut from the gradient of its padded block."""
  if gi == go == 1:
    return d_padded
  c, k = rows.shape
  bi, bo = block
  cs = c // go
  d = d_padded.reshape(cs, go, k, gi, bi, go, bo)
  mask = _pack_mask(rows.reshape(cs, go, k), gi, go)
  picked = jnp.where(mask, d, jnp.zeros((), d.dtype)).sum(axis=(3, 5), dtype=d.dtype)
  return picked.reshape(c, k, bi, bo)


def _tpu_params(*semantics: str) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _tpu_forward(x, values, rows, t: Tiles, interpret: bool) -> jax.Array:
  n = x.shape[0]
  c, _, _, bo = values.shape
  w, srows = _tpu_pack(values, rows, t.gi, t.go)  # (Cs, Ks, bi', bo'), (Cs, Ks)
  cs, ks, bi_, bo_ = w.shape
  tn = t.tn
  padded = _round_up(n, tn)

  def kernel(srows_ref, x_ref, w_ref, y_ref, acc_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    @pl.when(k == ks - 1)
    def _():
      y_ref[...] = acc_ref[...].astype(y_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=(cs, padded // tn, ks),
    in_specs=[
      pl.BlockSpec((tn, bi_), lambda m, j, k, s: (j, s[m * ks + k])),  # x tile at the block-row
      pl.BlockSpec((None, None, bi_, bo_), lambda m, j, k, s: (m, k, 0, 0)),  # one weight block
    ],
    out_specs=pl.BlockSpec((tn, bo_), lambda m, j, k, s: (j, m)),
    scratch_shapes=[pltpu.VMEM((tn, bo_), jnp.float32)],
  )
  y = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((padded, c * bo), x.dtype),
    grid_spec=grid_spec,
    compiler_params=_tpu_params('parallel', 'parallel', 'arbitrary'),
    interpret=interpret,
    name='block_sparse_fwd',
  )(srows.reshape(-1), _pad_tokens(x, padded), w)
  return y[:n]


def _tpu_transposed_plan(srows: jax.Array, r: int):
  """The blocks sorted by (padded) block-row, one 'init' step before each row's blocks.

  Returns per step (length C K + R): row, column, k, flags (1: a block to add, 2: the row's last
  step). An init step names the blocks of the next real step, so the pipeline fetches them once.
  """
  cs, ks = srows.shape
  e = cs * ks
  flat = srows.reshape(-1)
  row = jnp.concatenate([flat, jnp.arange(r, dtype=jnp.int32)])
  real = jnp.concatenate([jnp.ones(e, jnp.int32), jnp.zeros(r, jnp.int32)])
  entry = jnp.concatenate([jnp.arange(e, dtype=jnp.int32), jnp.zeros(r, jnp.int32)])
  order = jnp.argsort(row * 2 + real, stable=True)
  row, real, entry = row[order], real[order], entry[order]
  by_row = jnp.argsort(flat, stable=True).astype(jnp.int32)  # the real steps' entries, in order
  before = jnp.cumsum(real) - real  # real steps before each step
  entry = jnp.where(real == 1, entry, by_row[jnp.minimum(before, e - 1)])
  last = jnp.concatenate([row[1:] != row[:-1], jnp.ones((1,), bool)])
  flags = real + 2 * last.astype(jnp.int32)
  return row, entry // ks, entry % ks, flags


def _tpu_dx(dy, values, rows, d_in: int, t: Tiles, interpret: bool) -> jax.Array:
  n = dy.shape[0]
  w, srows = _tpu_pack(values, rows, t.gi, t.go)
  _, _, bi_, bo_ = w.shape
  tn = t.tn
  padded = _round_up(n, tn)
  row, col, kk, flags = _tpu_transposed_plan(srows, d_in // bi_)

  def kernel(row_ref, col_ref, k_ref, flag_ref, dy_ref, w_ref, dx_ref, acc_ref):
    del row_ref, col_ref, k_ref
    flag = flag_ref[pl.program_id(1)]

    @pl.when((flag & 1) == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((flag & 1) == 1)
    def _():
      acc_ref[...] += jax.lax.dot_general(
        dy_ref[...], w_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
      )  # (tn, bo') x (bi', bo')^T

    @pl.when(flag >= 2)
    def _():
      dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=4,
    grid=(padded // tn, row.shape[0]),
    in_specs=[
      pl.BlockSpec((tn, bo_), lambda j, p, row, col, k, f: (j, col[p])),
      pl.BlockSpec((None, None, bi_, bo_), lambda j, p, row, col, k, f: (col[p], k[p], 0, 0)),
    ],
    out_specs=pl.BlockSpec((tn, bi_), lambda j, p, row, col, k, f: (j, row[p])),
    scratch_shapes=[pltpu.VMEM((tn, bi_), jnp.float32)],
  )
  dx = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((padded, d_in), dy.dtype),
    grid_spec=grid_spec,
    compiler_params=_tpu_params('parallel', 'arbitrary'),
    interpret=interpret,
    name='block_sparse_dx',
  )(row, col, kk, flags, _pad_tokens(dy, padded), w)
  return dx[:n]


def _tpu_dw(x, dy, rows, block: tuple[int, int], dtype, t: Tiles, interpret: bool) -> jax.Array:
  n = x.shape[0]
  c, k = rows.shape
  bi_, bo_ = t.gi * block[0], t.go * block[1]
  cs, ks = c // t.go, t.go * k
  srows = (rows.reshape(cs, t.go, k) // t.gi).reshape(-1)
  tn = t.tn
  padded = _round_up(n, tn)
  steps = padded // tn

  def kernel(srows_ref, x_ref, dy_ref, dw_ref, acc_ref):
    del srows_ref
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    xt = x_ref[...].astype(jnp.float32).T.astype(x_ref.dtype)  # (bi', tn)
    acc_ref[...] += jnp.dot(xt, dy_ref[...], preferred_element_type=jnp.float32)

    @pl.when(j == steps - 1)
    def _():
      dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=(cs, ks, steps),
    in_specs=[
      pl.BlockSpec((tn, bi_), lambda m, k, j, s: (j, s[m * ks + k])),
      pl.BlockSpec((tn, bo_), lambda m, k, j, s: (j, m)),
    ],
    out_specs=pl.BlockSpec((None, None, bi_, bo_), lambda m, k, j, s: (m, k, 0, 0)),
    scratch_shapes=[pltpu.VMEM((bi_, bo_), jnp.float32)],
  )
  dw = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((cs, ks, bi_, bo_), dtype),
    grid_spec=grid_spec,
    compiler_params=_tpu_params('parallel', 'parallel', 'arbitrary'),
    interpret=interpret,
    name='block_sparse_dw',
  )(srows, _pad_tokens(x, padded), _pad_tokens(dy, padded))
  return _tpu_unpack(dw, rows, t.gi, t.go, block)


# ----- GPU (Triton): a program per output tile, looping over its blocks in global memory


def _div(i, m: int):
  """i // m and i % m for a power of two m, as shifts and masks (jnp's // and % lower badly in
  Triton)."""
  return i if m == 1 else jax.lax.shift_right_logical(i, m.bit_length() - 1)


def _mod(i, m: int):
  return jax.lax.bitwise_and(i, m - 1)


def _gpu_params(t: Tiles) -> pltriton.CompilerParams:
  return pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


def _gpu_forward(x, values, rows, t: Tiles, interpret: bool) -> jax.Array:
  n = x.shape[0]
  c, k, bi, bo = values.shape
  tn, tk = t.tn, min(t.tk, bi)
  nb = bi // tk  # chunks per block: one tl.dot per loop step, so Triton pipelines every load
  padded = _round_up(n, tn)

  def kernel(rows_ref, v_ref, x_ref, y_ref):
    col = pl.program_id(0)
    t0 = pl.multiple_of(pl.program_id(1) * tn, tn)

    def step(i, acc):  # chunk i: the tk-slice i % nb of block i // nb
      e = col * k + _div(i, nb)
      s0 = pl.multiple_of(_mod(i, nb) * tk, tk) if nb > 1 else 0
      xs = x_ref[pl.ds(t0, tn), pl.ds(pl.multiple_of(rows_ref[e] * bi + s0, tk), tk)]  # (tn, tk)
      w = v_ref[e, pl.ds(s0, tk), :]  # (tk, bo)
      return acc + jnp.dot(xs, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k * nb, step, jnp.zeros((tn, bo), jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)

  y = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((padded, c * bo), x.dtype),
    grid=(c, padded // tn),  # columns fastest: concurrent programs share x's token tile in L2
    in_specs=[pl.no_block_spec] * 3,
    out_specs=pl.BlockSpec((tn, bo), lambda col, j: (j, col)),
    compiler_params=_gpu_params(t),
    interpret=interpret,
    name='block_sparse_fwd',
  )(rows.reshape(-1), values.reshape(c * k, bi, bo), _pad_tokens(x, padded))
  return y[:n]


def _gpu_dx(dy, values, rows, d_in: int, t: Tiles, interpret: bool) -> jax.Array:
  n = dy.shape[0]
  c, k, bi, bo = values.shape
  r = d_in // bi
  tn, tk = t.tn, min(t.tk, bo)
  nb = bo // tk
  padded = _round_up(n, tn)
  flat = rows.reshape(-1)
  entry = jnp.argsort(flat, stable=True).astype(jnp.int32)  # the blocks by block-row (CSR)
  counts = jnp.zeros((r,), jnp.int32).at[flat].add(1)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])

  def kernel(starts_ref, entry_ref, v_ref, dy_ref, dx_ref):
    row = pl.program_id(0)
    t0 = pl.multiple_of(pl.program_id(1) * tn, tn)

    def step(i, acc):  # chunk i: the tk-slice i % nb of the row's block i // nb
      e = entry_ref[_div(i, nb)]
      s0 = pl.multiple_of(_mod(i, nb) * tk, tk) if nb > 1 else 0
      c0 = pl.multiple_of(jax.lax.div(e, k) * bo + s0, tk)
      dys = dy_ref[pl.ds(t0, tn), pl.ds(c0, tk)]  # (tn, tk)
      w = v_ref[e, :, pl.ds(s0, tk)]  # (bi, tk)
      return acc + jax.lax.dot_general(
        dys, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
      )

    lo, hi = starts_ref[row] * nb, starts_ref[row + 1] * nb
    acc = jax.lax.fori_loop(lo, hi, step, jnp.zeros((tn, bi), jnp.float32))
    dx_ref[...] = acc.astype(dx_ref.dtype)

  dx = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((padded, d_in), dy.dtype),
    grid=(r, padded // tn),
    in_specs=[pl.no_block_spec] * 4,
    out_specs=pl.BlockSpec((tn, bi), lambda row, j: (j, row)),
    compiler_params=_gpu_params(t),
    interpret=interpret,
    name='block_sparse_dx',
  )(starts, entry, values.reshape(c * k, bi, bo), _pad_tokens(dy, padded))
  return dx[:n]


def _gpu_dw(x, dy, rows, block: tuple[int, int], dtype, t: Tiles, interpret: bool) -> jax.Array:
  n = x.shape[0]
  c, k = rows.shape
  bi, bo = block
  tw = min(t.tk, t.tn)  # tokens per chunk
  padded = _round_up(n, t.tn)
  chunks = padded // tw
  e = c * k
  split = 1  # token splits: enough programs to fill the GPU, each a whole number of chunks
  while e * split < GPU_DW_PROGRAMS and chunks % (2 * split) == 0:
    split *= 2
  per = chunks // split

  def kernel(rows_ref, x_ref, dy_ref, dw_ref):
    ent = pl.program_id(0)
    first = pl.program_id(1) * per
    r0 = pl.multiple_of(rows_ref[ent] * bi, bi)
    c0 = pl.multiple_of(jax.lax.div(ent, k) * bo, bo)

    def step(i, acc):
      t0 = pl.multiple_of((first + i) * tw, tw)
      xs = x_ref[pl.ds(t0, tw), pl.ds(r0, bi)]  # (tw, bi)
      dys = dy_ref[pl.ds(t0, tw), pl.ds(c0, bo)]  # (tw, bo)
      return acc + jax.lax.dot_general(
        xs, dys, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
      )

    dw_ref[...] = jax.lax.fori_loop(0, per, step, jnp.zeros((bi, bo), jnp.float32))

  partial = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((split, e, bi, bo), jnp.float32),
    grid=(e, split),
    in_specs=[pl.no_block_spec] * 3,
    out_specs=pl.BlockSpec((None, None, bi, bo), lambda ent, q: (q, ent, 0, 0)),
    compiler_params=_gpu_params(t),
    interpret=interpret,
    name='block_sparse_dw',
  )(rows.reshape(-1), _pad_tokens(x, padded), _pad_tokens(dy, padded))
  return partial.sum(axis=0).reshape(c, k, bi, bo).astype(dtype)


# ----- dispatch


def _xla_forward(x, values, rows, t, interpret):
  del t, interpret
  return block.gather_matmul_xla(x, values, rows)


def _xla_grads(x, values, rows, dy, k_dx, t, interpret):
  del t, interpret
  return block.gather_matmul_grads(x, values, rows, dy, k_dx)


def _kernel_grads(dx_fn, dw_fn):
  def grads(x, values, rows, dy, k_dx, t, interpret):
    d_in = x.shape[1]
    dx = dx_fn(dy, values[:, :k_dx], rows[:, :k_dx], d_in, t, interpret)
    dv = dw_fn(x, dy, rows, values.shape[2:], values.dtype, t, interpret)
    return dx, dv

  return grads


_FORWARD = {'tpu': _tpu_forward, 'gpu': _gpu_forward, 'xla': _xla_forward}
_GRADS = {
  'tpu': _kernel_grads(_tpu_dx, _tpu_dw),
  'gpu': _kernel_grads(_gpu_dx, _gpu_dw),
  'xla': _xla_grads,
}


def _family(interpret: bool | str) -> str | None:
  """The kernel family interpret mode runs (True: 'gpu'), None when compiling."""
  if interpret is False or interpret is None:
    return None
  family = 'gpu' if interpret is True else interpret
  if family not in FAMILIES:
    raise ValueError(f'interpret={interpret!r}; allowed: False, True, {", ".join(FAMILIES)}')
  return family


def _per_platform(table, arrays, *static, interpret):
  """table[family](*arrays, *static, tiles, interpret) for each platform's kernel family (the
  XLA formulation where the shape is unsupported, and on the CPU); with `interpret` set, that
  family's kernels interpreted on any platform."""
  x, values = arrays[:2]
  n, d_in = x.shape
  c, _, bi, bo = values.shape

  def branch(family: str, interp: bool):
    t = tiles(family, n, (d_in, c * bo), (bi, bo), x.dtype)
    return lambda *args: table[t.family](*args, *static, t, interp)

  family = _family(interpret)
  if family is not None:
    return branch(family, True)(*arrays)
  gpu = branch('gpu', False)
  return jax.lax.platform_dependent(
    *arrays,
    tpu=branch('tpu', False),
    cuda=gpu,
    rocm=gpu,
    default=lambda *args: table['xla'](*args, *static, None, False),
  )


def _common_dtype(x, values):
  dtype = jnp.result_type(x.dtype, values.dtype)
  return x.astype(dtype), values.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_matmul(x, values, rows, interpret):
  return _per_platform(_FORWARD, (x, values, rows), interpret=interpret)


def _fwd(x, values, rows, interpret):
  return _gather_matmul(x, values, rows, interpret), (x, values, rows)


def _bwd(interpret, res, dy):
  x, values, rows = res
  k = values.shape[1]
  dx, dv = _per_platform(_GRADS, (x, values, rows, dy), k, interpret=interpret)
  return dx, dv, None


_gather_matmul.defvjp(_fwd, _bwd)


def gather_matmul(
  x: jax.Array, values: jax.Array, rows: jax.Array, interpret: bool | str = False
) -> jax.Array:
  """x (N, D_in) -> (N, C * bo) through the kernels of the platform it is lowered for.

  `interpret`: False (compiled: TPU / GPU kernels, the XLA formulation on the CPU), or a kernel
  family 'tpu' / 'gpu' (True: 'gpu') run in interpret mode on any backend.
  """
  x, values = _common_dtype(x, values)
  return _gather_matmul(x, values, rows.astype(jnp.int32), interpret)


def gather_matmul_grads(
  x: jax.Array,
  values: jax.Array,
  rows: jax.Array,
  dy: jax.Array,
  k_dx: int | None = None,
  interpret: bool | str = False,
) -> tuple[jax.Array, jax.Array]:
  """(dx, d values) like `block.gather_matmul_grads`, through the dx and dW kernels."""
  x, values = _common_dtype(x, values)
  k = values.shape[1] if k_dx is None else k_dx
  arrays = (x, values, rows.astype(jnp.int32), dy.astype(x.dtype))
  return _per_platform(_GRADS, arrays, k, interpret=interpret)


def kernel_family(
  platform: str, n: int, shape: tuple[int, int], block: tuple[int, int], dtype: Any
) -> Tiles:
  """What runs on `platform` ('tpu', 'cuda', 'rocm', 'cpu') for N tokens through a (D_in, D_out)
  kernel of (bi, bo) blocks, with the reason."""
  if platform == 'tpu':
    return tpu_tiles(n, tuple(shape), tuple(block), dtype)
  if platform in ('cuda', 'rocm', 'gpu'):
    return gpu_tiles(n, tuple(block), dtype)
  return Tiles('xla', f'{platform}: the XLA formulation (no Pallas kernel off GPU / TPU)')
