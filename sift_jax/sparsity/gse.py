"""GSE's view of a layer: its inputs and output gradients, and gradients at sampled positions.

Dense layers. For y = x W with W of shape (D_in, D_out...) the weight gradient is dL/dW[i, j] =
sum_b x[b, i] * dL/dy[b, j]. GSE needs it only at C sampled (i, j) pairs, so it gathers the
C rows it needs and contracts over the batch: O(batch * C), no dense gradient.

Convolutions. A kernel (kh, kw, C_in, C_out) is the matrix (kh * kw * C_in, C_out) over the
input patches: row i = (tap, c) with tap = (a, b) the kernel offset, and

  dL/dW[a, b, c, o] = sum_{n, p, q} x_pad[n, p s_h + a d_h, q s_w + b d_w, c] * dL/dy[n, p, q, o]

(s the strides, d the kernel dilation, x_pad the padded input). A sampled (i, o) pair reads one
strided window of one input channel and one output channel's gradient, so the update gathers
those two (N * OH * OW)-long rows per sample, as for a dense layer: no patches matrix (kh * kw
times the input) and no dense weight gradient. The padded input is split into its s_h * s_w
stride phases once, so every window is a contiguous dynamic slice.

The trainer captures x and dL/dy with `capture`, a Flax method interceptor on the sparse
layers (any linen module that owns a sparse kernel and maps its input's last axis, such as
nn.Dense, nn.DenseGeneral(axis=-1), nn.Conv or the factory's SparseDense / SparseConv):

  perts = rule.zero_perturbations(model, variables, x)   # once, outside the step
  with rule.execute(sstate):                             # capture, under either execution
    def loss_fn(fwd, perts):
      out, mutated = model.apply({'params': fwd, 'perturbations': perts, **state}, x,
                                 mutable=[*state, 'intermediates'])
      return loss(out), mutated['intermediates']
    (loss, inter), (g_fwd, g_perts) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(fwd, perts)
  aux = {'intermediates': inter, 'perturbations': g_perts}

The perturbations are zeros added to each sparse layer's output, so their gradient is dL/dy.
A convolution's geometry (strides, padding, dilation) is static: `capture` records it in the
`convs` dict it is given while the model is traced, and the update reads it from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from sift_jax.registry import DISTRIBUTIONS
from sift_jax.sparsity import plan

INPUTS = 'gse_inputs'  # sown into the 'intermediates' collection
OUTPUTS = 'gse_outputs'  # perturbation name in the 'perturbations' collection
_CHUNK = 2**21  # gathered elements per operand and chunk: bounds sampled_grads' memory
_PAD_MODES = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}  # flax's padding by value, then VALID


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """What maps a conv's input to its patches: strides, dilation, explicit pads and pad mode."""

  strides: tuple[int, ...]
  dilation: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]  # (low, high) per spatial axis; negative crops
  mode: str = 'constant'  # jnp.pad mode: constant (zeros), wrap, reflect


@DISTRIBUTIONS.register('er')
def erdos_renyi(
  shapes: Sequence[tuple[int, ...]], sparsity: float, power_scale: float
) -> list[float]:
  """Erdos-Renyi over each kernel's (fan_in, fan_out) matrix view: the GSE code's distribution.

  density ~ (fan_in + fan_out) / (fan_in * fan_out), fan_in = prod(shape[:-1]) (kh * kw * C_in
  for a conv); `erk` instead uses sum(shape) / prod(shape) of the whole kernel shape, which
  gives a conv (kh + kw + C_in + C_out) / (kh kw C_in C_out). Layers over density 1 are dense,
  as in `erk`.
  """
  views = [(int(np.prod(s[:-1])), int(s[-1])) for s in shapes]
  return plan.erk(views, sparsity, power_scale)


def _module_path(kernel_path: Sequence[str]) -> tuple[str, ...]:
  path = tuple(kernel_path)
  if path and path[0] == 'params':
    path = path[1:]
  if not path or path[-1] != 'kernel':
    raise ValueError(f'gse works on kernels named "kernel"; got {"/".join(path)}')
  return path[:-1]


def conv_geometry(mod: nn.Conv, input_shape: Sequence[int]) -> ConvGeometry:
  """The patch geometry of `mod` applied to inputs of `input_shape` (flax's own padding rules)."""
  name = '/'.join(mod.path)
  ks = (mod.kernel_size,) if isinstance(mod.kernel_size, int) else tuple(mod.kernel_size)
  n = len(ks)

  def per_axis(v: int | Sequence[int] | None, what: str) -> tuple[int, ...]:
    v = 1 if v is None else v
    out = (v,) * n if isinstance(v, int) else tuple(v)
    if len(out) != n:
      raise ValueError(f'gse: conv {name} has {what}={v!r} for a {n}-d kernel')
    return out

  if per_axis(mod.input_dilation, 'input_dilation') != (1,) * n or mod.feature_group_count != 1:
    raise ValueError(
      f'gse: conv {name} has input_dilation={mod.input_dilation!r}, '
      f'feature_group_count={mod.feature_group_count}; only 1 and 1 are supported'
    )
  strides = per_axis(mod.strides, 'strides')
  dilation = per_axis(mod.kernel_dilation, 'kernel_dilation')
  spatial = tuple(input_shape[-n - 1 : -1])
  dilated = tuple((k - 1) * d + 1 for k, d in zip(ks, dilation, strict=True))
  padding = canonicalize_padding(mod.padding, n)
  mode, pads = 'constant', padding
  if padding in ('CIRCULAR', 'REFLECT'):
    mode, pads = _PAD_MODES[padding], [((k - 1) // 2, k // 2) for k in dilated]
  elif padding == 'CAUSAL':
    pads = [(dilated[0] - 1, 0)] * n  # flax allows it for 1-d convs only
  elif isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(spatial, dilated, strides, padding)
  return ConvGeometry(strides, dilation, tuple((int(lo), int(hi)) for lo, hi in pads), mode)


@contextlib.contextmanager
def capture(
  kernel_paths: Sequence[Sequence[str]], convs: dict[tuple[str, ...], ConvGeometry] | None = None
) -> Iterator[None]:
  """Sows each sparse layer's input and perturbs its output while the context is open.

  The geometry of each sparse convolution goes into `convs` (module path -> ConvGeometry);
  without `convs` a sparse convolution is an error.
  """
  modules = {_module_path(p) for p in kernel_paths}
  active: set[int] = set()  # modules inside their own call: SparseDense calls Dense.__call__

  def interceptor(next_fun: Callable[..., Any], args, kwargs, context) -> Any:
    mod = context.module
    if context.method_name != '__call__' or id(mod) in active or mod.path not in modules:
      return next_fun(*args, **kwargs)
    if isinstance(mod, nn.Conv):
      if convs is None:
        raise ValueError(f'gse: conv {"/".join(mod.path)} needs a convs dict for its geometry')
      convs[tuple(mod.path)] = conv_geometry(mod, args[0].shape)
    elif isinstance(mod, (nn.ConvLocal, nn.ConvTranspose)):
      raise ValueError(
        f'gse: {"/".join(mod.path)} is a {type(mod).__name__}; gse supports Dense-like layers '
        'and nn.Conv'
      )
    active.add(id(mod))
    try:
      mod.sow('intermediates', INPUTS, args[0])
      return mod.perturb(OUTPUTS, next_fun(*args, **kwargs))
    finally:
      active.discard(id(mod))

  with nn.intercept_methods(interceptor):
    yield


def zero_perturbations(
  model: nn.Module, capture_fn: Callable[[], Any], variables: Any, *args, **kwargs
) -> Any:
  """The zero 'perturbations' collection for `model.apply(variables, *args, **kwargs)`."""

  def run(v):
    with capture_fn():
      return model.apply(v, *args, mutable=['perturbations', 'intermediates'], **kwargs)[1]

  shapes = jax.eval_shape(run, variables)['perturbations']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _get(tree: Any, path: Sequence[str], what: str) -> Any:
  node = tree
  for part in path:
    if not hasattr(node, 'keys') or part not in node:
      raise ValueError(
        f'gse aux has no {what} for layer {"/".join(path)}; did the trainer run the model '
        'inside rule.execute(sstate) with mutable "intermediates" and differentiate the '
        'perturbations?'
      )
    node = node[part]
  return node


def sampled_layer_grads(
  aux: Any,
  kernel_path: Sequence[str],
  shape: tuple[int, ...],
  idx: jax.Array,
  convs: dict[tuple[str, ...], ConvGeometry] | None = None,
) -> jax.Array:
  """dL/dW of one sparse layer at flat kernel positions idx (C,), from the captured aux.

  A layer whose module path is in `convs` is a convolution; any other contracts its input's
  last axis (a dense layer).
  """
  mod = _module_path(kernel_path)
  geometry = (convs or {}).get(mod)
  if geometry is not None:
    x, gy = _layer_io(aux, mod)
    return _conv_grads(x, gy, shape, geometry, idx, '/'.join(mod))
  return sampled_grads(*dense_io(aux, kernel_path, shape), idx)


def _layer_io(aux: Any, mod: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """The captured input and output gradient of the module at path `mod`."""
  x = _get(aux['intermediates'], (*mod, INPUTS), 'inputs')
  x = x[0] if isinstance(x, tuple) else x
  return x, _get(aux['perturbations'], (*mod, OUTPUTS), 'output gradients')


def dense_io(aux: Any, kernel_path: Sequence[str], shape: tuple[int, ...]) -> tuple:
  """A dense layer's captured input (N, D_in) and output gradient (N, D_out)."""
  mod = _module_path(kernel_path)
  x, gy = _layer_io(aux, mod)
  d_in, d_out = shape[0], int(np.prod(shape[1:]))
  if x.shape[-1] != d_in or gy.size * d_in != x.size * d_out:
    raise ValueError(
      f'gse: layer {"/".join(mod)} has kernel {shape} but inputs {x.shape} and output '
      f'gradients {gy.shape}; only layers contracting the input last axis, and nn.Conv '
      'layers traced inside rule.capture(), are supported'
    )
  return x.reshape(-1, d_in), gy.reshape(-1, d_out)


def sampled_block_grads(
  x: jax.Array, gy: jax.Array, block: tuple[int, int], rows: jax.Array
) -> jax.Array:
  """dL/dW of a dense layer at sampled (bi, bo) blocks: block-row rows[c, s] of block-column c,
  x[:, rows_block]^T @ gy[:, cols_block] per sample: (C, S, bi, bo), no dense gradient.

  x (N, D_in), gy (N, D_out); the gather is feature-major as in the block-sparse layer.
  """
  n = x.shape[0]
  bi, bo = block
  xt = x.astype(jnp.float32).T.reshape(-1, bi, n)  # (R, bi, N)
  gt = gy.astype(jnp.float32).T.reshape(-1, bo, n)  # (C, bo, N)
  return jnp.einsum('csin,con->csio', xt[rows], gt)  # (C, S, bi, bo)


def sampled_grads(x: jax.Array, gy: jax.Array, idx: jax.Array) -> jax.Array:
  """dL/dW at flat positions idx of a dense layer: sum_b x[b, i] gy[b, j], (i, j) = divmod(idx, D_out).

  x (N, D_in), gy (N, D_out). Indices must lie in [0, D_in * D_out).
  """
  xt = x.astype(jnp.float32).T  # (D_in, N)
  return _contract(lambda i: xt.at[i].get(mode='promise_in_bounds'), gy, idx)


def _contract(rows_x: Callable[[jax.Array], jax.Array], gy: jax.Array, idx: jax.Array) -> jax.Array:
  """sum_n rows_x(i)[n] * gy[n, j] at (i, j) = divmod(idx, D_out), in chunks of samples.

  rows_x maps a chunk of row indices (chunk,) to their input rows (chunk, N). Each sample reads
  two contiguous rows of length N of the transposed operands (not 2N scattered elements: 4-6x
  faster on CPU); chunks bound the gathered memory to _CHUNK elements per operand.
  """
  n, d_out, c = gy.shape[0], gy.shape[1], idx.shape[0]
  if c == 0:
    return jnp.zeros((0,), jnp.float32)
  chunk = max(1, min(c, _CHUNK // max(n, 1)))
  pad = (-c) % chunk
  gt = gy.astype(jnp.float32).T  # (D_out, N)
  # (C / chunk, chunk) row and column indices; the padding reads row 0, column 0.
  i = jnp.pad(idx // d_out, (0, pad)).reshape(-1, chunk)
  j = jnp.pad(idx % d_out, (0, pad)).reshape(-1, chunk)

  def dots(ij):
    rows_g = gt.at[ij[1]].get(mode='promise_in_bounds')  # (chunk, N)
    return jnp.sum(rows_x(ij[0]) * rows_g, axis=1)  # (chunk,)

  return jax.lax.map(dots, (i, j)).reshape(-1)[:c]


def _conv_grads(
  x: jax.Array,
  gy: jax.Array,
  shape: tuple[int, ...],
  geo: ConvGeometry,
  idx: jax.Array,
  name: str,
) -> jax.Array:
  """Sampled weight gradients of a convolution (module docstring), x (..., *S, C_in)."""
  ks, c_in, c_out = shape[:-2], shape[-2], shape[-1]
  n = len(ks)
  x = x.reshape(-1, *x.shape[-n - 1 :]).astype(jnp.float32)  # (B, *S, C_in)
  gy = gy.reshape(-1, *gy.shape[-n - 1 :])  # (B, *O, C_out)
  out = gy.shape[1:-1]
  if x.shape[-1] != c_in or gy.shape[-1] != c_out or len(ks) != len(geo.strides):
    raise ValueError(
      f'gse: conv {name} has kernel {shape} but inputs {x.shape} and output gradients {gy.shape}'
    )
  if geo.mode == 'constant':
    x = jax.lax.pad(x, 0.0, [(0, 0, 0), *((lo, hi, 0) for lo, hi in geo.pads), (0, 0, 0)])
  else:
    x = jnp.pad(x, [(0, 0), *geo.pads, (0, 0)], mode=geo.mode)
  expect = tuple(
    (p - (k - 1) * d - 1) // s + 1
    for p, k, d, s in zip(x.shape[1:-1], ks, geo.dilation, geo.strides, strict=True)
  )
  if expect != out:
    raise ValueError(
      f'gse: conv {name}: output gradients {gy.shape} but the geometry gives {expect}'
    )
  # Stride phases: x[b, q s + r, ..., c] -> phases[r..., c, b, q...], padded to whole strides.
  b, split, tail = x.shape[0], [x.shape[0]], [(0, 0)]
  for p, s in zip(x.shape[1:-1], geo.strides, strict=True):
    split += [-(-p // s), s]
    tail.append((0, -p % s))
  x = jnp.pad(x, [*tail, (0, 0)])
  x = x.reshape(*split, c_in)  # (B, Q1, s1, Q2, s2, ..., C_in)
  perm = [2 + 2 * k for k in range(n)] + [2 * n + 1, 0] + [1 + 2 * k for k in range(n)]
  phases = x.transpose(perm)  # (s1, ..., C_in, B, Q1, ...)
  # Per tap (kernel offset, row-major like the kernel): its phase r and start a per axis.
  offsets = np.stack(np.meshgrid(*(np.arange(k) for k in ks), indexing='ij'), -1).reshape(-1, n)
  offsets = offsets * np.asarray(geo.dilation)  # (T, n)
  tap_r = jnp.asarray(offsets % np.asarray(geo.strides), jnp.int32)  # (T, n)
  tap_a = jnp.asarray(offsets // np.asarray(geo.strides), jnp.int32)  # (T, n)
  zero = jnp.zeros((), jnp.int32)

  def window(row):  # one input row: (B, *O) strided window of channel row % C_in
    tap, c = row // c_in, row % c_in
    start = (*tap_r[tap], c, zero, *tap_a[tap])
    return jax.lax.dynamic_slice(phases, start, (1,) * (n + 1) + (b, *out)).reshape(-1)

  return _contract(jax.vmap(window), gy.reshape(-1, c_out), idx)
