"""Block-sparse execution of a model built with the masked sparse layers, and its state.

A model keeps its masked layers (SparseDense); under `block_execution(rows)` every Dense layer
whose kernel has block-rows in `rows` runs the block-sparse gather-matmul instead, reading its
'kernel' parameter as the stored blocks (C, K, bi, bo). So the same model runs in either mode and
only the state differs:

  masked        params: dense kernels (D_in, D_out)  + masks (bool, the kernel's shape)
  block_sparse  params: the kernels' blocks (C, K, bi, bo) + rows (int32 (C, K))

With block-sparse params the gradients, and so the optimizer state, exist only for the stored
blocks. `to_block_state` / `to_masked_state` convert a params tree (and any params-shaped tree
such as optimizer moments) between the two, so a checkpoint written in one mode resumes in the
other. Trees follow the sparsity engine's convention: masks and rows are params-shaped with None
at dense leaves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax

from sift_jax.sparse_layers.block import check_balanced, check_dense_kernel, from_masked, to_masked
from sift_jax.sparse_layers.block_dense import block_matmul, forward_prefix_matmul


def _is_none(x: Any) -> bool:
  return x is None


def _keys(keypath: Any) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', k)) for k in keypath)


def block_paths(rows: Any) -> dict[tuple[str, ...], jax.Array]:
  """Module path -> rows (C, K) of every block-sparse kernel in a params-shaped rows tree."""
  flat = jax.tree_util.tree_flatten_with_path(rows)[0]
  out = {}
  for kp, r in flat:
    path = _keys(kp)
    if path[-1] != 'kernel':
      raise ValueError(f'block-sparse rows at {"/".join(path)}: only Dense kernels run blocked')
    out[path[:-1]] = r
  return out


@contextlib.contextmanager
def block_execution(rows: Any, impl: str = 'auto', forward: Any = None) -> Iterator[None]:
  """Within the context, `model.apply` runs the Dense layers that `rows` names block-sparse.

  Their 'kernel' parameter must hold the blocks (C, K, bi, bo) (`to_block_state`). `forward`
  (rows-shaped, an int per kernel) runs only that many leading blocks of each column forward
  and trains all K (`forward_prefix_matmul`: Top-KAST's sets A and B).
  """
  by_module = block_paths(rows)
  prefix = {} if forward is None else dict(zip(by_module, jax.tree.leaves(forward), strict=True))

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    r = by_module.get(tuple(module.path))
    if r is None or context.method_name != '__call__' or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    x = args[0]
    values = module.get_variable('params', 'kernel').astype(module.dtype)  # (C, K, bi, bo)
    k = prefix.get(tuple(module.path))
    x = x.astype(module.dtype)
    if k is None:
      y = block_matmul(x, values, r, impl)
    else:
      y = forward_prefix_matmul(x, values, r, k, impl)
    if module.use_bias:
      y = y + module.get_variable('params', 'bias').astype(module.dtype)
    return y  # (..., D_out)

  with nn.intercept_methods(interceptor):
    yield


def _map_params_like(fn, params: Any, tree: Any) -> Any:
  """Applies fn to every subtree of `tree` shaped like `params` (an optimizer state's moments)."""
  treedef = jax.tree.structure(params)
  like = lambda t: jax.tree.structure(t) == treedef
  return jax.tree.map(lambda t: fn(t) if like(t) else t, tree, is_leaf=like)


def to_block_state(
  params: Any,
  masks: Any,
  block: tuple[int, int],
  *others: Any,
  counts: Any = None,
  first: Any = None,
) -> tuple[Any, Any, list[Any]]:
  """(dense params, balanced masks) -> (params with blocks at the masked kernels, rows, others).

  In `others` (e.g. an optimizer state) every params-shaped subtree is converted the same way.
  `counts` (params-shaped, K per masked kernel, None elsewhere) fixes the shapes, so this runs
  under jit; without it the masks must be concrete and each is checked to be balanced with
  whole blocks, which gives its K. `first` (masks-shaped subsets of the masks) puts those blocks
  first in each block-column.
  """
  flat_m = jax.tree.leaves(masks, is_leaf=_is_none)
  flat_f = [None] * len(flat_m) if first is None else jax.tree.leaves(first, is_leaf=_is_none)
  treedef = jax.tree.structure(masks, is_leaf=_is_none)
  paths = [_keys(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  given = [None] * len(flat_m) if counts is None else jax.tree.leaves(counts, is_leaf=_is_none)
  rows, counts = [], []
  for path, m, f, p, k in zip(paths, flat_m, flat_f, jax.tree.leaves(params), given, strict=True):
    if m is None:
      rows.append(None)
      counts.append(None)
      continue
    check_dense_kernel(tuple(p.shape), block, '/'.join(path))
    k = check_balanced(m, block) if k is None else k
    rows.append(from_masked(p, m, block, k, f)[1])
    counts.append(k)

  def convert(tree: Any) -> Any:
    leaves = [
      p if k is None else from_masked(p, m, block, k, f)[0]
      for p, m, f, k in zip(jax.tree.leaves(tree), flat_m, flat_f, counts, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)

  others = [_map_params_like(convert, params, t) for t in others]
  return convert(params), jax.tree.unflatten(treedef, rows), others


def to_masked_state(params: Any, rows: Any, shapes: Any, *others: Any) -> tuple[Any, Any, list]:
  """The inverse of `to_block_state`: (block params, rows, dense shapes) -> (params, masks).

  `shapes` is a params-shaped tree of the dense shapes (arrays or ShapeDtypeStructs); weights
  outside the stored blocks come back as zeros, masks as the blocks' positions; params-shaped
  subtrees of `others` are converted like the params.
  """
  flat_r = jax.tree.leaves(rows, is_leaf=_is_none)
  flat_s = [tuple(s.shape) for s in jax.tree.leaves(shapes)]

  def convert(tree: Any, want_masks: bool = False) -> Any:
    leaves = []
    for v, r, shape in zip(jax.tree.leaves(tree), flat_r, flat_s, strict=True):
      if r is None:
        leaves.append(None if want_masks else v)
        continue
      kernel, mask = to_masked(v, r, shape)
      leaves.append(mask if want_masks else kernel)
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)

  others = [_map_params_like(convert, params, t) for t in others]
  return convert(params), convert(params, want_masks=True), others
