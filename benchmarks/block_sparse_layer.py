"""Forward + backward time of one Sparse Wide layer, masked and block-sparse, over the dense layer.

  python benchmarks/block_sparse_layer.py                       # GPT-3 Small's MLP layer
  python benchmarks/block_sparse_layer.py --d_in=64 --d_out=256 --tokens=64 --blocks=16 --windows=1

The dense layer is D_in x D_out; Sparse Wide at s widens both sides by sqrt(round(1/(1-s))) (GPT-3
Small at s = 0.75: 768 x 3072 -> 1536 x 6144). Each case times the value and gradients (input and
weights) of sum(y^2) in one jitted function: masked (dense matmul of the masked kernel) and
block-sparse (`sparse_layers.block_matmul`'s XLA loop over the block-columns, K = round((1-s) R)
blocks per block-column) for each block size, as the median of interleaved windows in this one
process, then prints time / dense.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sift_jax import sparse_layers  # noqa: E402
from sift_jax.sift import sizes  # noqa: E402
from sift_jax.sparsity import select  # noqa: E402

_D_IN = flags.DEFINE_integer('d_in', 768, 'Dense layer input width (GPT-3 Small d_model).')
_D_OUT = flags.DEFINE_integer('d_out', 3072, 'Dense layer output width (GPT-3 Small d_ff).')
_TOKENS = flags.DEFINE_integer('tokens', 2048, 'Rows of the activation (batch x context).')
_LEVEL = flags.DEFINE_float('level', 0.75, 'Sparsity s of the Sparse Wide layer.')
_BLOCKS = flags.DEFINE_list('blocks', ['32', '64', '128'], 'Square block sizes.')
_WINDOWS = flags.DEFINE_integer('windows', 5, 'Interleaved timing windows (median reported).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Calls per window.')


def value_and_grads(apply):
  """jit(x, w -> (sum(apply(x, w)^2), d/dx, d/dw))."""
  loss = lambda x, w: jnp.sum(jnp.square(apply(x, w)))
  return jax.jit(jax.value_and_grad(loss, (0, 1)))


def cases(level: float) -> dict:
  """name -> (fn, args): dense, masked Sparse Wide and block-sparse Sparse Wide per block size."""
  d_in, d_out, n = _D_IN.value, _D_OUT.value, _TOKENS.value
  wide = sizes.width_factor(level)
  w_in, w_out = sizes.scale_width(d_in, wide), sizes.scale_width(d_out, wide)
  key = jax.random.key(0)
  x = jax.random.normal(key, (n, d_in))  # (N, D_in)
  xw = jax.random.normal(key, (n, w_in))  # (N, k D_in)
  out = {
    'dense': (value_and_grads(lambda x, w: x @ w), (x, jnp.ones((d_in, d_out)))),
  }
  for b in (int(s) for s in _BLOCKS.value):
    block = (b, b)
    sparse_layers.check_dense_kernel((w_in, w_out), block, 'the Sparse Wide layer')
    r, c = w_in // b, w_out // b
    k = max(1, round((1 - level) * r))
    mask = select.from_blocks(select.balanced_random_mask(key, (r, c), k), block)  # (kD_in, kD_out)
    kernel = jax.random.normal(key, (w_in, w_out)) * mask
    values, rows = sparse_layers.from_masked(kernel, mask, block, k)
    masked = value_and_grads(lambda x, w, mask=mask: x @ (w * mask))
    blocked = value_and_grads(lambda x, v, rows=rows: sparse_layers.block_matmul(x, v, rows, 'xla'))
    if 'masked' not in out:
      out['masked'] = (masked, (xw, kernel))
    out[f'block {b}'] = (blocked, (xw, values))
  return out


def time_once(fn, args) -> float:
  start = time.perf_counter()
  for _ in range(_REPEATS.value):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / _REPEATS.value


def main(argv):
  del argv
  level = _LEVEL.value
  table = cases(level)
  for fn, args in table.values():
    jax.block_until_ready(fn(*args))  # compile
  times = {name: [] for name in table}
  for _ in range(_WINDOWS.value):
    for name, (fn, args) in table.items():
      times[name].append(time_once(fn, args))
  dense = statistics.median(times['dense'])
  print(f'device: {jax.devices()[0].device_kind}; s = {level}, {_TOKENS.value} tokens')
  print(f'{"case":<10} {"ms":>9} {"time/dense":>11}')
  for name, t in times.items():
    m = statistics.median(t)
    print(f'{name:<10} {m * 1e3:9.2f} {m / dense:11.2f}')


if __name__ == '__main__':
  app.run(main)
