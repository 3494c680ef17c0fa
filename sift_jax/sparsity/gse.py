"""GSE's view of a layer: its inputs and output gradients, and gradients at sampled positions.

For y = x W with W of shape (D_in, D_out...) the weight gradient is dL/dW[i, j] =
sum_b x[b, i] * dL/dy[b, j]. GSE needs it only at C sampled (i, j) pairs, so it gathers the
C columns it needs and contracts over the batch: O(batch * C), no dense gradient.

The trainer captures x and dL/dy with `capture`, a Flax method interceptor on the sparse
layers (any linen module that owns a sparse kernel and maps its input's last axis, such as
nn.Dense, nn.DenseGeneral(axis=-1) or the factory's SparseDense):

  perts = rule.zero_perturbations(model, variables, x)   # once, outside the step
  with rule.capture():
    def loss_fn(fwd, perts):
      out, mutated = model.apply({'params': fwd, 'perturbations': perts, **state}, x,
                                 mutable=[*state, 'intermediates'])
      return loss(out), mutated['intermediates']
    (loss, inter), (g_fwd, g_perts) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(fwd, perts)
  aux = {'intermediates': inter, 'perturbations': g_perts}

The perturbations are zeros added to each sparse layer's output, so their gradient is dL/dy.
Convolutions are not supported (a clear error): their sampled gradient needs the im2col-free
correlation formula, which is not implemented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUTS = 'gse_inputs'  # sown into the 'intermediates' collection
OUTPUTS = 'gse_outputs'  # perturbation name in the 'perturbations' collection
_CHUNK = 2**21  # gathered elements per operand and chunk: bounds sampled_grads' memory


def _module_path(kernel_path: Sequence[str]) -> tuple[str, ...]:
  path = tuple(kernel_path)
  if path and path[0] == 'params':
    path = path[1:]
  if not path or path[-1] != 'kernel':
    raise ValueError(f'gse works on kernels named "kernel"; got {"/".join(path)}')
  return path[:-1]


@contextlib.contextmanager
def capture(kernel_paths: Sequence[Sequence[str]]) -> Iterator[None]:
  """Sows each sparse layer's input and perturbs its output while the context is open."""
  modules = {_module_path(p) for p in kernel_paths}
  active: set[int] = set()  # modules inside their own call: SparseDense calls Dense.__call__

  def interceptor(next_fun: Callable[..., Any], args, kwargs, context) -> Any:
    mod = context.module
    if context.method_name != '__call__' or id(mod) in active or mod.path not in modules:
      return next_fun(*args, **kwargs)
    if isinstance(mod, nn.Conv):
      raise ValueError(
        f'gse supports dense layers only; {"/".join(mod.path)} is a convolution '
        '(use rigl or set for conv nets)'
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
        'inside rule.capture() with mutable "intermediates" and differentiate the perturbations?'
      )
    node = node[part]
  return node


def layer_aux(aux: Any, kernel_path: Sequence[str], shape: tuple[int, ...]):
  """(inputs (N, D_in), output grads (N, D_out)) of one sparse layer from the captured aux."""
  mod = _module_path(kernel_path)
  x = _get(aux['intermediates'], (*mod, INPUTS), 'inputs')
  x = x[0] if isinstance(x, tuple) else x
  gy = _get(aux['perturbations'], (*mod, OUTPUTS), 'output gradients')
  d_in, d_out = shape[0], int(np.prod(shape[1:]))
  if x.shape[-1] != d_in or gy.size * d_in != x.size * d_out:
    raise ValueError(
      f'gse: layer {"/".join(mod)} has kernel {shape} but inputs {x.shape} and output '
      f'gradients {gy.shape}; only layers contracting the input last axis are supported'
    )
  return x.reshape(-1, d_in), gy.reshape(-1, d_out)  # (N, D_in), (N, D_out)


def sampled_grads(x: jax.Array, gy: jax.Array, idx: jax.Array) -> jax.Array:
  """dL/dW at flat kernel positions idx: sum_b x[b, i] * gy[b, j], (i, j) = divmod(idx, D_out).

  Works on the transposed activations, so each sample gathers two contiguous rows of length N
  (not 2N scattered elements: 4-6x faster on CPU), in chunks of samples that bound the
  gathered memory to _CHUNK elements per operand. Indices must lie in [0, D_in * D_out).
  """
  n, c = x.shape[0], idx.shape[0]
  if c == 0:
    return jnp.zeros((0,), jnp.float32)
  chunk = max(1, min(c, _CHUNK // max(n, 1)))
  pad = (-c) % chunk
  xt = x.astype(jnp.float32).T  # (D_in, N)
  gt = gy.astype(jnp.float32).T  # (D_out, N)
  # (C / chunk, chunk) row and column indices; the padding reads row 0, column 0.
  i = jnp.pad(idx // gy.shape[1], (0, pad)).reshape(-1, chunk)
  j = jnp.pad(idx % gy.shape[1], (0, pad)).reshape(-1, chunk)

  def dots(ij):
    rows_x = xt.at[ij[0]].get(mode='promise_in_bounds')  # (chunk, N)
    rows_g = gt.at[ij[1]].get(mode='promise_in_bounds')  # (chunk, N)
    return jnp.sum(rows_x * rows_g, axis=1)  # (chunk,)

  return jax.lax.map(dots, (i, j)).reshape(-1)[:c]
