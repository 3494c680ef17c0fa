"""How the 2-D convolutions run: XLA's own convolution, or a weight gradient as one matmul (im2col).

XLA:CPU lowers a convolution's weight gradient to a convolution whose window is the whole image,
which its kernels run several times slower than the forward convolution. `im2col_conv` computes
the same forward and input gradient as `lax.conv_general_dilated` but its weight gradient as
patches^T @ grad_out: the input's kh * kw shifted (strided) copies stacked on the channel axis,
(B * H_out * W_out, kh * kw * C_in), contracted with the output gradient (B * H_out * W_out, C_out).

`conv_general_dilated` has lax.conv_general_dilated's signature and runs the implementation
chosen by the innermost `use_impl` scope (lax's when none is open), so Flax's nn.Conv takes it as
its `conv_general_dilated` field and a model picks the implementation from its config at trace
time (`use_impl(resolve_impl(config.model.conv_impl))` around its body).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# 'im2col_large': im2col for the convolutions over batches of at least IM2COL_MIN_BATCH examples
# (per device), XLA's for the others.
IMPLS = ('xla', 'im2col', 'im2col_large')
IM2COL_MIN_BATCH = 128
# 'auto' resolves per backend to the implementation measured faster there (benchmarks/README.md:
# on CPU im2col won at batch 128 and lost at 32 and 64).
AUTO = {'cpu': 'im2col_large'}
_DIMS = ('NHWC', 'HWIO', 'NHWC')
_IMPL = contextvars.ContextVar('conv_impl', default='xla')


def resolve_impl(name: str, backend: str | None = None) -> str:
  """'xla', 'im2col', or for 'auto' the faster one on `backend` (default: JAX's default backend)."""
  if name == 'auto':
    return AUTO.get(backend or jax.default_backend(), 'xla')
  if name not in IMPLS:
    raise ValueError(f'model.conv_impl {name!r}; allowed: auto, {", ".join(IMPLS)}')
  return name


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
  """Runs the convolutions traced inside this scope with implementation `name` (not 'auto')."""
  if name not in IMPLS:
    raise ValueError(f'conv implementation {name!r}; allowed: {", ".join(IMPLS)}')
  token = _IMPL.set(name)
  try:
    yield
  finally:
    _IMPL.reset(token)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
  """lax.conv_general_dilated, or `im2col_conv` where the innermost `use_impl` scope says so."""
  impl = _IMPL.get()
  if impl == 'im2col_large':
    impl = 'im2col' if lhs.shape[0] >= IM2COL_MIN_BATCH else 'xla'  # NHWC: batch first
  fn = im2col_conv if impl == 'im2col' else lax.conv_general_dilated
  return fn(lhs, rhs, *args, **kwargs)


def im2col_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """lax.conv_general_dilated of an NHWC input and HWIO kernel whose weight gradient is a matmul.

  Supports what the models use: two spatial dimensions, any strides and padding, no dilation,
  no feature or batch groups; anything else raises.
  """
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMS)
  if lhs.ndim != 4 or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != dims:
    raise ValueError(
      f'im2col_conv supports 2-D NHWC inputs with HWIO kernels; got input {lhs.shape}, kernel '
      f'{rhs.shape}, dimension_numbers {dimension_numbers}'
    )
  dilations = tuple(lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1))
  if any(d != 1 for d in dilations) or feature_group_count != 1 or batch_group_count != 1:
    raise ValueError(
      f'im2col_conv supports no dilation or groups; got lhs_dilation {lhs_dilation}, '
      f'rhs_dilation {rhs_dilation}, feature_group_count {feature_group_count}, '
      f'batch_group_count {batch_group_count}'
    )
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], tuple(window_strides), padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(tuple(window_strides), pads, precision, preferred_element_type, lhs, rhs)


def _xla_conv(strides, pads, precision, out_type, x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(
    x,
    w,
    strides,
    pads,
    dimension_numbers=_DIMS,
    precision=precision,
    preferred_element_type=out_type,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _conv(strides, pads, precision, out_type, x: jax.Array, w: jax.Array) -> jax.Array:
  return _xla_conv(strides, pads, precision, out_type, x, w)


def _conv_fwd(strides, pads, precision, out_type, x, w):
  return _xla_conv(strides, pads, precision, out_type, x, w), (x, w)


def _conv_bwd(strides, pads, precision, out_type, residuals, dy):
  x, w = residuals
  # XLA's own input gradient (a convolution it runs fast), without recomputing the forward.
  conv_of_x = functools.partial(_xla_conv, strides, pads, precision, out_type, w=w)
  (dx,) = jax.linear_transpose(conv_of_x, jax.ShapeDtypeStruct(x.shape, x.dtype))(dy)
  return dx, weight_grad(x, dy, w.shape, strides, pads, precision).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def patches(
  x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]]
) -> jax.Array:
  """The input under every kernel tap, (B, H_out, W_out, kh * kw * C_in) in HWI order."""
  (kh, kw), (sh, sw) = kernel_size, strides
  b, _, _, c = x.shape
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))  # (B, H + pads, W + pads, C_in)
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  taps = [
    lax.slice(
      xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
    )
    for i in range(kh)
    for j in range(kw)
  ]  # kh * kw x (B, H_out, W_out, C_in)
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def weight_grad(
  x: jax.Array,
  dy: jax.Array,
  kernel_shape: Sequence[int],
  strides: Sequence[int],
  pads: Sequence[tuple[int, int]],
  precision: Any = None,
) -> jax.Array:
  """dL/dw (kh, kw, C_in, C_out) of an NHWC/HWIO convolution, as patches^T @ dy."""
  p = patches(x, kernel_shape[:2], strides, pads)  # (B, H_out, W_out, kh * kw * C_in)
  dw = lax.dot_general(
    p, dy, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision
  )  # (kh * kw * C_in, C_out)
  return dw.reshape(kernel_shape)
