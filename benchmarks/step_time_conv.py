"""GFLOP/s of XLA:CPU's 3x3 convolutions on CIFAR ResNet-18 shapes: forward, input and weight grad.

  python benchmarks/step_time_conv.py                        # default XLA options vs YNNPACK convs
  python benchmarks/step_time_conv.py --batch=32 --variants=default,fast_math

Every variant compiles the same three functions with its own XLA compiler options, all in this
one process, so variants are compared under the same load (the machine is shared). FLOPs are
2 * B * H * W * 9 * C_in * C_out for each of the three convolutions.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags
from step_time_xla import VARIANTS, check_variants

from sift_jax.sparse_layers.conv import weight_grad

# (spatial size, channels) of the 3x3 stride-1 convs in each stage of the CIFAR ResNet-18.
STAGES = ((32, 64), (16, 128), (8, 256), (4, 512))
DIMS = ('NHWC', 'HWIO', 'NHWC')

_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size.')
_VARIANTS = flags.DEFINE_list('variants', ['default', 'ynn_conv'], f'From {list(VARIANTS)}.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement; the best is kept.')


def conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DIMS)


def passes() -> dict:
  """The forward conv, the two halves of its VJP and the weight grad as one im2col matmul."""
  return {
    'forward': lambda x, w, dy: conv(x, w),
    'input_grad': lambda x, w, dy: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0],
    'weight_grad': lambda x, w, dy: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0],
    'wgrad_im2col': lambda x, w, dy: weight_grad(x, dy, w.shape, (1, 1), ((1, 1), (1, 1))),
  }


def best_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def main(argv):
  del argv
  check_variants(_VARIANTS.value)
  dtype = jnp.dtype(_DTYPE.value)
  b = _BATCH.value
  print(f'3x3 convs, batch {b}, {_DTYPE.value}; GFLOP/s (best of {_REPEATS.value})')
  print(f'{"H":>3} {"C":>4} {"pass":<12}' + ''.join(f'{v:>12}' for v in _VARIANTS.value))
  key = jax.random.key(0)
  for h, c in STAGES:
    kx, kw, kd, key = jax.random.split(key, 4)
    x = jax.random.normal(kx, (b, h, h, c), dtype)  # (B, H, W, C)
    w = jax.random.normal(kw, (3, 3, c, c), dtype)  # (3, 3, C_in, C_out)
    dy = jax.random.normal(kd, (b, h, h, c), dtype)  # (B, H, W, C)
    gflop = 2 * b * h * h * 9 * c * c / 1e9
    for pass_name, fn in passes().items():
      lowered = jax.jit(fn).lower(x, w, dy)
      rates = []
      for v in _VARIANTS.value:
        compiled = lowered.compile(compiler_options=VARIANTS[v])
        rates.append(gflop / best_seconds(compiled, (x, w, dy), _REPEATS.value))
      if pass_name == 'wgrad_im2col':
        ref = jax.jit(passes()['weight_grad'])(x, w, dy)
        got = jax.jit(fn)(x, w, dy)
        err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        if err > 1e-2:
          raise AssertionError(f"im2col weight grad differs from XLA's by {err:.2g} (relative)")
      print(f'{h:>3} {c:>4} {pass_name:<12}' + ''.join(f'{r:12.1f}' for r in rates), flush=True)


if __name__ == '__main__':
  app.run(main)
