"""One call from an optax optimizer to a sparse-training one (as jaxpruner's `wrap_optax`).

    tx = wrap_optax(optax.adam(1e-3), params, level=0.9, rule='rigl', total_steps=1000)
    opt_state = tx.init(params)
    fwd = masked_params(opt_state, params)              # what the forward pass uses
    grads = jax.grad(loss_fn)(fwd, batch)               # gradients w.r.t. the MASKED weights
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

The returned transformation runs `sparse_apply`, the trainer's sparse step (docs/design.md's data
flow), inside `update`: masked optimizer step, then the mask update on its schedule, with the
rule's state (masks, key, step count) kept in the optimizer state. The trainer uses the explicit
API instead (`make_rule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SparseState(NamedTuple):
  """The wrapped optimizer's state: the inner optimizer's, the rule's and the step count."""

  inner: Any
  sparsity: Any  # the rule's MaskState
  count: jax.Array  # int32 scalar: the step the next update is


def wrap_optax(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  level: float,
  total_steps: int,
  rule: str = 'rigl',
  sparse_paths: Sequence[Sequence[str]] | None = None,
  seed: int = 0,
  **options: Any,
) -> optax.GradientTransformation:
  """`tx` training the sparse kernels of `params` (arrays or shapes) at sparsity `level`.

  `rule` is any registered rule but gse (its update needs layer activations: use `make_rule`);
  `options` are the plan's and the rule's keyword options, named as the `sparsity` config keys
  (update_every_steps, drop_fraction, distribution, backward_level, ...; see `build_rule`).
  `sparse_paths` None applies the default filter (every kernel but the first and last layer,
  embeddings and norms). `update` needs `params` and the gradients w.r.t.
  `masked_params(opt_state, params)`.
  """
  from sift_jax.sparsity import build_rule, sparse_apply  # this module is imported by the package

  if options.get('init_rescale'):
    raise ValueError('init_rescale changes the initial params: use make_rule and rule.init')
  if options.get('execution', 'masked') != 'masked':
    raise ValueError('wrap_optax keeps dense params (execution=masked): use make_rule instead')
  sparse = build_rule(
    rule, params, sparse_paths, level=float(level), total_steps=total_steps, **options
  )
  if sparse.needs_aux:
    raise ValueError(
      f"rule={rule!r} needs each layer's inputs and output gradients: use make_rule "
      '(docs/library.md, "Sparse training") instead of wrap_optax'
    )

  def init(params: Any) -> SparseState:
    sstate, _ = sparse.init(params, jax.random.key(seed))
    return SparseState(tx.init(params), sstate, jnp.zeros((), jnp.int32))

  def update(grads: Any, state: SparseState, params: Any = None) -> tuple[Any, SparseState]:
    if params is None:
      raise ValueError('the sparse optimizer needs params: tx.update(grads, opt_state, params)')
    # Inactive weights 0 from the first step (`params` are the caller's, never masked).
    base = sparse.execution.commit_params(state.sparsity, params)
    sstate, new, inner = sparse_apply(
      sparse, tx, state.sparsity, base, state.inner, grads, state.count
    )
    updates = jax.tree.map(lambda n, p: n - p, new, params)
    return updates, SparseState(inner, sstate, state.count + 1)

  return optax.GradientTransformation(init, update)


def masked_params(opt_state: Any, params: Any) -> Any:
  """The weights the forward pass uses: `params` with the masks in `opt_state` applied."""
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseState))
    if isinstance(s, SparseState)
  ]
  if len(found) != 1:
    raise ValueError(f'expected one wrap_optax state in opt_state, found {len(found)}')
  return jax.tree.map(
    lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
    found[0].sparsity.masks,
    params,
    is_leaf=lambda x: x is None,
  )
