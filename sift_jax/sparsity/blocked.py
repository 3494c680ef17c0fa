"""A mask-update rule over block-sparse state (sparsity.execution = block_sparse).

Under block-sparse execution each sparse kernel is stored as its active blocks and their
block-rows (sift_jax.sparse_layers): the state holds 'rows' where masked execution holds 'masks'.
The rules keep working on masks: on an update step (inside the jitted step, under lax.cond) the
state is expanded to the masked form, the rule updates masks, params and optimizer state exactly
as under masked execution, and the result is packed back with the same K per block-column, so
shapes never change and nothing recompiles. The dense gradient RigL grows by is computed in that
branch only, by a masked forward and backward of the pre-step weights on the step's batch: one
dense gradient per dT steps, as SPEC.md's RigL FLOP count assumes.

Runs static, set and rigl with balanced masks. Top-KAST keeps dense theta outside its sets, GSE
and GMP cannot keep balanced masks: they raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sift_jax.sparse_layers import to_block_state, to_masked_state
from sift_jax.sparsity.rules import Rule, Static, _DropGrow

SUPPORTED = (Static, _DropGrow)


class BlockRule:
  """Wraps a rule whose plan is balanced; converts its state to and from block-sparse form."""

  def __init__(self, rule: Rule) -> None:
    name = type(rule).__name__
    if not isinstance(rule, SUPPORTED):
      raise ValueError(
        f'rule {name} does not run block-sparse (sparsity.execution=block_sparse); '
        'allowed: static, set, rigl'
      )
    if not all(layer.balanced for layer in rule.layers):
      raise ValueError('block-sparse execution needs a balanced plan (make_rule sets it)')
    blocks = {layer.block for layer in rule.layers}
    if len(blocks) > 1:
      raise ValueError(f'one block shape per model, got {sorted(blocks)}')
    self.rule = rule
    self.block = blocks.pop() if blocks else (1, 1)
    self.counts = rule._tree([layer.active_blocks // layer.columns for layer in rule.layers])
    self.shapes = jax.tree.unflatten(
      rule.treedef, [jax.ShapeDtypeStruct(s, jnp.float32) for s in rule.shapes]
    )

  def pack(self, sstate: dict[str, Any], params: Any, *others: Any) -> tuple:
    """Masked (sstate, params, others...) -> block-sparse: 'masks' become 'rows'."""
    params_b, rows, others = to_block_state(
      params, sstate['masks'], self.block, *others, counts=self.counts
    )
    sstate_b = {**{k: v for k, v in sstate.items() if k != 'masks'}, 'rows': rows}
    return sstate_b, params_b, *others

  def unpack(self, sstate_b: dict[str, Any], params_b: Any, *others: Any) -> tuple:
    """The inverse of `pack`: weights outside the stored blocks are zero."""
    params, masks, others = to_masked_state(params_b, sstate_b['rows'], self.shapes, *others)
    sstate = {**{k: v for k, v in sstate_b.items() if k != 'rows'}, 'masks': masks}
    return sstate, params, *others

  def init(self, params: Any, rng: jax.Array) -> tuple[dict[str, Any], Any]:
    """The rule's exact-count balanced masks, packed: (sstate with 'rows', block params)."""
    return self.pack(*self.rule.init(params, rng))

  def update(
    self,
    sstate_b: dict[str, Any],
    params_b: Any,
    opt_state: Any,
    step: jax.Array,
    rng: jax.Array | None,
    dense_grad: Callable[[Any], Any],
    params_before: Any,
  ) -> tuple[dict[str, Any], Any, Any]:
    """The rule's update on block-sparse state (after the optimizer step, as masked execution).

    `dense_grad(weights)` is the task-loss gradient w.r.t. masked dense weights on the step's
    batch; it is called on update steps only, with the pre-step weights `params_before` (block
    form) expanded, which is the gradient masked execution hands the rule.
    """
    if not self.rule.updates_masks or not self.rule.layers:
      return sstate_b, params_b, opt_state
    step = jnp.asarray(step, jnp.int32)

    def run(operands):
      sstate_b, params_b, opt_state = operands
      before = to_masked_state(params_before, sstate_b['rows'], self.shapes)[0]
      sstate, params, opt_state = self.unpack(sstate_b, params_b, opt_state)
      g = dense_grad(before)
      return self.pack(*self.rule.update(sstate, params, g, opt_state, step, rng))

    return jax.lax.cond(
      self.rule.schedule.is_update(step), run, lambda o: o, (sstate_b, params_b, opt_state)
    )
