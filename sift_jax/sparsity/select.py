"""Exact top-k selection in linear time, and block views of masks.

`topk_mask` picks exactly k entries of a score array without sorting: the k-th largest
score is found by radix selection on an order-preserving integer image of the floats (two
histogram passes over 16-bit digits, each linear in n), and ties at the threshold are broken
by index (lowest first), so counts are exact and the result equals a stable descending
argsort. k may be a traced value: shapes never depend on it, so nothing recompiles.

The balanced variants (`balanced_topk_mask`, `balanced_random_mask`) pick exactly k entries in
every column (the last axis) instead of k in the whole array: what block-sparse execution needs,
a constant number of active blocks per output block-column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_DIGIT = 16  # radix select in two passes of 16-bit digits


def order_keys(scores: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (-0.0 counts as +0.0; NaN with all bits set maps to 0)."""
  scores = scores.astype(jnp.float32)
  scores = jnp.where(scores == 0, jnp.float32(0), scores)
  bits = jax.lax.bitcast_convert_type(scores, jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _top_digit(digits: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The digit d holding the k-th largest entry, how many entries have a digit above d, and
  how many have digit d.

  Entries equal to 2**_DIGIT are ignored (filtered out by the caller).
  """
  hist = jnp.bincount(digits, length=2**_DIGIT + 1)[: 2**_DIGIT]  # (65536,)
  at_or_above = jnp.cumsum(hist[::-1])[::-1]  # (65536,): count(digit >= d), non-increasing
  d = jnp.sum(at_or_above >= k, dtype=jnp.int32) - 1
  return d, at_or_above[d] - hist[d], hist[d]


def _kth_largest_key(keys: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k-th largest value t of uint32 `keys` (1 <= k <= keys.size) by two histogram passes,
  with count(keys > t) and count(keys == t) read off the histograms (no extra pass)."""
  hi = (keys >> _DIGIT).astype(jnp.int32)  # (n,)
  d_hi, above_hi, _ = _top_digit(hi, k)
  lo = jnp.where(hi == d_hi, (keys & (2**_DIGIT - 1)).astype(jnp.int32), 2**_DIGIT)  # (n,)
  d_lo, above_lo, ties = _top_digit(lo, k - above_hi)
  t = (d_hi.astype(jnp.uint32) << _DIGIT) | d_lo.astype(jnp.uint32)
  return t, above_hi + above_lo, ties


def flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every position, built from iotas (no reshape: sharding-friendly)."""
  idx = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return idx


def _first_ties(tie: jax.Array, need: jax.Array) -> jax.Array:
  """The `need` lowest-index (row-major) True entries of `tie`, in one pass over it.

  Ties are counted per row (every axis but the last: a reduction, which stays sharded); a
  cumsum over those counts finds the row holding the need-th tie and a cumsum over that one
  row its column. A cumsum over the whole flattened layer would make XLA gather a sharded
  layer onto every device, and a bisection on an index bound costs log2(n) passes.
  """
  row_ties = jnp.sum(tie, axis=-1, dtype=jnp.int32).reshape(-1)  # (R,)
  through = jnp.cumsum(row_ties)  # (R,): ties in rows 0..r
  r = jnp.minimum(jnp.sum(through < need, dtype=jnp.int32), row_ties.size - 1)
  need_in_row = need - (through[r] - row_ties[r])
  row = tie[jnp.unravel_index(r, tie.shape[:-1])] if tie.ndim > 1 else tie  # (C,)
  col = jnp.sum(jnp.cumsum(row, dtype=jnp.int32) < need_in_row, dtype=jnp.int32)
  return tie & (flat_index(tie.shape) <= r * tie.shape[-1] + col) & (need > 0)


def topk_keys_mask(keys: jax.Array, k: jax.Array | int) -> jax.Array:
  """Bool mask of the k largest uint32 keys (ties by lowest flat index); exactly min(k, n)."""
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, keys.size)
  t, above, ties = _kth_largest_key(keys.reshape(-1), jnp.maximum(k, 1))
  need = k - above  # ties to take; 0 <= need <= ties except when k = 0
  return jax.lax.cond(
    need >= ties,
    lambda: keys >= t,
    lambda: (keys > t) | _first_ties(keys == t, need),
  )


def topk_mask(scores: jax.Array, k: jax.Array | int, valid: jax.Array | None = None) -> jax.Array:
  """Bool mask of the k largest scores among `valid` entries; exactly min(k, #valid) True.

  Invalid entries get key 0, below every valid key, so they are only taken when k exceeds the
  number of valid entries; callers clamp k so that never happens.
  """
  keys = jnp.maximum(order_keys(scores), jnp.uint32(1))
  if valid is not None:
    keys = jnp.where(valid, keys, jnp.uint32(0))
  k = jnp.asarray(k, jnp.int32)
  if valid is not None:
    k = jnp.minimum(k, jnp.sum(valid, dtype=jnp.int32))
  return topk_keys_mask(keys, k)


def random_mask(key: jax.Array, shape: tuple[int, ...], k, valid: jax.Array | None = None):
  """Exactly k positions drawn uniformly without replacement among `valid` (all if None)."""
  bits = jnp.maximum(jax.random.bits(key, shape, jnp.uint32), jnp.uint32(1))
  if valid is not None:
    bits = jnp.where(valid, bits, jnp.uint32(0))
    k = jnp.minimum(k, jnp.sum(valid, dtype=jnp.int32))
  return topk_keys_mask(bits, k)


def balanced_topk_keys_mask(keys: jax.Array, k: jax.Array | int) -> jax.Array:
  """Bool mask of the k largest uint32 keys in every column (the last axis; rows are all other
  axes), ties by lowest row index; exactly min(k, rows) per column.

  `k` is one count for every column or one per column (shape (C,)), possibly traced. A stable
  sort per column: the arrays this runs on are block grids, far smaller than the weights.
  """
  shape = keys.shape
  cols = shape[-1]
  flat = keys.reshape(-1, cols)  # (R, C)
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (cols,))  # (C,)
  order = jnp.argsort(~flat, axis=0, stable=True)  # (R, C): rows by descending key
  taken = jax.lax.broadcasted_iota(jnp.int32, flat.shape, 0) < k  # (R, C) in sorted order
  col = jax.lax.broadcasted_iota(jnp.int32, flat.shape, 1)
  return jnp.zeros(flat.shape, bool).at[order, col].set(taken).reshape(shape)


def _valid_keys(keys: jax.Array, k, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Keys with invalid entries at 0 and k clamped to each column's valid count."""
  k = jnp.asarray(k, jnp.int32)
  if valid is None:
    return keys, k
  per_col = jnp.sum(valid.reshape(-1, valid.shape[-1]), axis=0, dtype=jnp.int32)  # (C,)
  return jnp.where(valid, keys, jnp.uint32(0)), jnp.minimum(k, per_col)


def balanced_topk_mask(
  scores: jax.Array, k: jax.Array | int, valid: jax.Array | None = None
) -> jax.Array:
  """Bool mask of the k largest scores among `valid` entries of every column (last axis);
  exactly min(k, #valid in the column) True per column, ties by lowest row index."""
  keys, k = _valid_keys(jnp.maximum(order_keys(scores), jnp.uint32(1)), k, valid)
  return balanced_topk_keys_mask(keys, k)


def balanced_random_mask(
  key: jax.Array, shape: tuple[int, ...], k, valid: jax.Array | None = None
) -> jax.Array:
  """Exactly k positions per column (last axis), uniformly without replacement among `valid`."""
  bits = jnp.maximum(jax.random.bits(key, shape, jnp.uint32), jnp.uint32(1))
  return balanced_topk_keys_mask(*_valid_keys(bits, k, valid))


def check_block(shape: tuple[int, ...], block: tuple[int, int], name: str) -> None:
  """Blocks tile the last two axes of a kernel; they must divide them."""
  if len(block) != 2 or min(block) < 1:
    raise ValueError(f'sparsity.block_shape {block} must be two positive ints')
  if block != (1, 1) and (len(shape) < 2 or shape[-2] % block[0] or shape[-1] % block[1]):
    raise ValueError(f'block_shape {block} does not tile the last two axes of {name} {shape}')


def num_blocks(shape: tuple[int, ...], block: tuple[int, int]) -> int:
  return int(np.prod(shape)) // (block[0] * block[1])


def to_blocks(x: jax.Array, block: tuple[int, int], reduce: str) -> jax.Array:
  """Reduces (..., I, O) to (..., I/bi, O/bo) by 'sum' (scores) or 'any' (masks)."""
  if block == (1, 1):
    return x
  bi, bo = block
  *lead, i, o = x.shape
  x = x.reshape(*lead, i // bi, bi, o // bo, bo)  # (..., I/bi, bi, O/bo, bo)
  axes = (len(lead) + 1, len(lead) + 3)
  return jnp.any(x, axis=axes) if reduce == 'any' else jnp.sum(x, axis=axes)


def from_blocks(mb: jax.Array, block: tuple[int, int]) -> jax.Array:
  """Expands a block mask (..., I/bi, O/bo) to the weight's shape (..., I, O)."""
  if block == (1, 1):
    return mb
  return jnp.repeat(jnp.repeat(mb, block[0], axis=-2), block[1], axis=-1)
