"""A mask-update rule over block-sparse state (sparsity.execution = block_sparse).

Under block-sparse execution each sparse kernel is stored as its active blocks (the params) and
their block-rows ('rows' in the sparsity state, where masked execution holds 'masks'), so the
gradients and the optimizer state exist only for the stored blocks (sift_jax.sparse_layers).
`BlockRule` wraps the masked rule and offers the trainer the same interface:

  sstate, params = rule.init(params, rng)             # balanced masks, packed into blocks
  with execute(rule, sstate): model.apply(...)        # sparse Dense layers run block-sparse
  sstate, params, opt_state = rule.update(sstate, params, g, opt_state, step, rng,
                                          aux=(dense_grad, params_before))

The rule itself keeps working on masks: on an update step (inside the jitted step, under
lax.cond) the state is expanded to the masked form, the rule updates masks, params and optimizer
state exactly as under masked execution, and the result is packed back with the same K per
block-column, so shapes never change and nothing recompiles. RigL's grow score, the dense
gradient, is computed in that branch only (`dense_grad`: a masked forward and backward of the
pre-step weights on the step's batch): one dense gradient per dT steps.

Runs static, set and rigl on Dense kernels. Top-KAST keeps dense theta outside its sets, GSE and
GMP cannot keep balanced masks, convolutions have no block-sparse layer: they raise.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp

from sift_jax.sparse_layers import (
  block_execution,
  check_dense_kernel,
  to_block_state,
  to_masked_state,
)
from sift_jax.sparse_layers.block import rows_mask
from sift_jax.sparsity.rules import Rule, Static, _DropGrow

SUPPORTED = (Static, _DropGrow)


def execute(rule: Any, sstate: dict[str, Any]) -> contextlib.AbstractContextManager:
  """The context a forward pass runs in: block-sparse layers for a BlockRule, else nothing."""
  return rule.execute(sstate) if isinstance(rule, BlockRule) else contextlib.nullcontext()


class BlockRule:
  """Wraps a balanced-plan rule; keeps its state in block-sparse form between updates."""

  needs_aux = False

  def __init__(self, rule: Rule) -> None:
    if not isinstance(rule, SUPPORTED):
      raise ValueError(
        f'rule {type(rule).__name__} does not run block-sparse (sparsity.execution='
        'block_sparse); allowed: static, set, rigl'
      )
    if not all(layer.balanced for layer in rule.layers):
      raise ValueError('block-sparse execution needs a balanced plan (make_rule sets it)')
    for layer in rule.layers:
      check_dense_kernel(layer.shape, layer.block, layer.name)
    blocks = {layer.block for layer in rule.layers}
    if len(blocks) > 1:
      raise ValueError(f'one block shape per model, got {sorted(blocks)}')
    self.rule = rule
    self.layers = rule.layers
    self.block = blocks.pop() if blocks else (1, 1)
    self.counts = rule._tree([layer.active_blocks // layer.columns for layer in rule.layers])
    self.shapes = jax.tree.unflatten(
      rule.treedef, [jax.ShapeDtypeStruct(s, jnp.float32) for s in rule.shapes]
    )

  # ----- conversions
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

  def masked_sstate(self, sstate_b: dict[str, Any]) -> dict[str, Any]:
    """The sparsity state with 'masks' rebuilt from 'rows' (for metrics and summaries)."""
    masks = [
      rows_mask(r, layer.shape, layer.block)
      for layer, r in zip(self.layers, self.rule._per_layer(sstate_b['rows']), strict=True)
    ]
    return {**{k: v for k, v in sstate_b.items() if k != 'rows'}, 'masks': self.rule._tree(masks)}

  # ----- the trainer's rule interface
  def init(self, params: Any, rng: jax.Array) -> tuple[dict[str, Any], Any]:
    """The rule's exact-count balanced masks, packed: (sstate with 'rows', block params)."""
    return self.pack(*self.rule.init(params, rng))

  def execute(self, sstate: dict[str, Any]) -> contextlib.AbstractContextManager:
    return block_execution(sstate['rows'])

  def capture(self) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()

  def forward_params(self, sstate: dict[str, Any], params: Any) -> Any:
    """The stored blocks are the forward weights (run them under `execute`)."""
    del sstate
    return params

  def param_grads(self, sstate: dict[str, Any], params: Any, g_fwd: Any) -> Any:
    del sstate, params
    return g_fwd

  def mask_updates(self, sstate: dict[str, Any], updates: Any) -> Any:
    del sstate
    return updates

  def loss_penalty(self, sstate: dict[str, Any], params: Any) -> jax.Array:
    return self.rule.loss_penalty(sstate, params)

  def metrics(self, sstate: dict[str, Any]) -> dict[str, jax.Array]:
    return self.rule.metrics(self.masked_sstate(sstate))

  def training_flops(self, report: Any, densities: Any, step: int) -> float:
    """The wrapped rule's accounting: block-sparse execution computes the same products."""
    return self.rule.training_flops(report, densities, step)

  def update(
    self,
    sstate: dict[str, Any],
    params: Any,
    g_fwd: Any,
    opt_state: Any,
    step: jax.Array,
    rng: jax.Array | None = None,
    aux: Any = None,
  ) -> tuple[dict[str, Any], Any, Any]:
    """The rule's update on block-sparse state (after the optimizer step, as masked execution).

    `aux` = (dense_grad, params_before): `dense_grad(weights)` is the task-loss gradient w.r.t.
    masked dense weights on the step's batch, called on update steps only, with the pre-step
    block params `params_before` expanded: the gradient masked execution hands the rule.
    `g_fwd` (the blocks' gradient) is not used.
    """
    del g_fwd
    if not self.rule.updates_masks or not self.layers:
      return sstate, params, opt_state
    if aux is None:
      raise ValueError('block-sparse updates need aux=(dense_grad, params_before)')
    dense_grad, params_before = aux
    step = jnp.asarray(step, jnp.int32)

    def run(operands):
      sstate_b, params_b, opt_state = operands
      before = to_masked_state(params_before, sstate_b['rows'], self.shapes)[0]
      sstate, params, opt_state = self.unpack(sstate_b, params_b, opt_state)
      g = dense_grad(before)
      return self.pack(*self.rule.update(sstate, params, g, opt_state, step, rng))

    return jax.lax.cond(
      self.rule.schedule.is_update(step), run, lambda o: o, (sstate, params, opt_state)
    )
