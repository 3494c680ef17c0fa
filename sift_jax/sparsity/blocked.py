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

Top-KAST stores set B's blocks, A's first in each block-column: the forward and the input
gradient run A's blocks, the weight gradient is computed for B's blocks only
(`forward_prefix_matmul`), the exploration penalty acts on the stored blocks. Its dense theta
(weights outside B keep their values) is 'theta' in the sparsity state: a frozen dense copy of
each sparse kernel that the plain step passes through untouched (the state is donated) and that
only a re-selection step reads and rewrites. Memory per sparse kernel: theta (1x the dense
kernel) + B's blocks with their gradient and optimizer state, against masked Top-KAST's dense
kernel, dense gradient and dense optimizer state (3-4x the kernel with Adam).

Runs static, set, rigl and topkast on Dense kernels. GSE and GMP cannot keep balanced masks,
convolutions have no block-sparse layer: they raise.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp

from sift_jax.sparse_layers import (
  block_execution,
  check_balanced,
  check_dense_kernel,
  to_block_state,
  to_masked_state,
)
from sift_jax.sparse_layers.block import rows_mask
from sift_jax.sparsity import gse as gse_lib
from sift_jax.sparsity.rules import GSE, RigL, Rule, Static, TopKAST, _DropGrow

SUPPORTED = (Static, _DropGrow, TopKAST, GSE)


def execute(rule: Any, sstate: dict[str, Any]) -> contextlib.AbstractContextManager:
  """The context a forward pass runs in: block-sparse layers for a BlockRule, else nothing."""
  return rule.execute(sstate) if isinstance(rule, BlockRule) else contextlib.nullcontext()


def convert_state(state: Any, source: Any, target: Any) -> Any:
  """A TrainState written under rule `source`'s execution, in rule `target`'s (a checkpoint of
  one mode resuming in the other); the same state when both run the same mode.

  Masked -> block-sparse checks the concrete masks: whole blocks, K per block-column as the
  target plan has it (a masked run resumes block-sparse only if its plan was balanced).
  """
  if isinstance(source, BlockRule) == isinstance(target, BlockRule):
    return state
  if isinstance(source, BlockRule):
    sstate, params, opt_state = source.unpack(state.sparsity, state.params, state.opt_state)
  else:
    checks = [(target.stored_key, target.counts)]
    if target.topkast:
      checks.append(('masks', target.forward))
    for key, counts in checks:
      masks = target.rule.per_layer(state.sparsity[key])
      for layer, m, k in zip(target.layers, masks, target.rule.per_layer(counts), strict=True):
        try:
          found = check_balanced(m, target.block)
        except ValueError as e:
          raise ValueError(f'{layer.name}: {e}; it cannot resume block-sparse') from None
        if found != k:
          raise ValueError(
            f'{layer.name}: the checkpoint has {found} active blocks per block-column in '
            f"'{key}', the block-sparse plan {k}; it cannot resume block-sparse"
          )
    sstate, params, opt_state = target.pack(state.sparsity, state.params, state.opt_state)
  return state.replace(params=params, opt_state=opt_state, sparsity=sstate)


def set_masks(rows: Any, shapes: Any, block: tuple[int, int], forward: Any = None) -> dict:
  """The masks of block-sparse rows: {'masks'}, or with `forward` (Top-KAST's static count of
  set A's blocks per column, a rows-shaped tree of ints) {'masks': A, 'backward': B}."""
  none = lambda x: x is None

  def masks(count=lambda *k: None):
    return jax.tree.map(
      lambda r, s, *k: None if r is None else rows_mask(r[:, : count(*k)], s.shape, block),
      rows,
      shapes,
      *([] if forward is None else [forward]),
      is_leaf=none,
    )

  if forward is None:
    return {'masks': masks()}
  return {'masks': masks(int), 'backward': masks()}


def unpack_state(
  sstate_b: dict[str, Any],
  params_b: Any,
  shapes: Any,
  block: tuple[int, int],
  forward: Any,
  *others: Any,
) -> tuple[Any, ...]:
  """Block-sparse (sstate, params, others...) -> masked; the inverse of `BlockRule.pack`.

  `shapes`: a params-shaped tree of the dense shapes; `forward` as in `set_masks`. Weights
  outside the stored blocks are zero, or for Top-KAST theta's frozen values.
  """
  params, stored, others = to_masked_state(params_b, sstate_b['rows'], shapes, *others)
  sstate = {k: v for k, v in sstate_b.items() if k not in ('rows', 'theta', 'forward_blocks')}
  if forward is not None:
    params = jax.tree.map(
      lambda p, m, t: p if m is None else jnp.where(m, p, t),
      params,
      stored,
      sstate_b['theta'],
      is_leaf=lambda x: x is None,
    )
  return {**sstate, **set_masks(sstate_b['rows'], shapes, block, forward)}, params, *others


class BlockRule:
  """Wraps a balanced-plan rule; keeps its state in block-sparse form between updates.

  Top-KAST stores set B's blocks, A's first in each block-column (the forward runs those,
  `forward_prefix_matmul`), and keeps dense theta as 'theta' in the state: read and written only
  on re-selection steps, frozen (and donated, not copied) on every other step.
  """

  def __init__(self, rule: Rule) -> None:
    if not isinstance(rule, SUPPORTED):
      raise ValueError(
        f'rule {type(rule).__name__} does not run block-sparse (sparsity.execution='
        'block_sparse); allowed: static, set, rigl, topkast, gse'
      )
    if not all(layer.balanced for layer in rule.layers):
      raise ValueError('block-sparse execution needs a balanced plan (make_rule sets it)')
    for layer in rule.layers:
      check_dense_kernel(layer.shape, layer.block, layer.name)
    blocks = {layer.block for layer in rule.layers}
    if len(blocks) > 1:
      raise ValueError(f'one block shape per model, got {sorted(blocks)}')
    self.rule = rule
    self.needs_aux = rule.needs_aux  # GSE: the layers' inputs and output gradients
    self.layers = rule.layers
    self.block = blocks.pop() if blocks else (1, 1)
    self.topkast = isinstance(rule, TopKAST)
    forward = [layer.active_blocks // layer.columns for layer in rule.layers]
    self.forward = rule.as_tree(forward) if self.topkast else None
    stored = forward
    if self.topkast:
      stored = [k // c.columns for c, k in zip(rule.layers, rule.backward_blocks, strict=True)]
    self.counts = rule.as_tree(stored)
    self.stored_key = 'backward' if self.topkast else 'masks'
    self.shapes = jax.tree.unflatten(
      rule.treedef, [jax.ShapeDtypeStruct(s, jnp.float32) for s in rule.shapes]
    )

  # ----- conversions
  def pack(self, sstate: dict[str, Any], params: Any, *others: Any) -> tuple:
    """Masked (sstate, params, others...) -> block-sparse: the masks become 'rows'."""
    first = sstate['masks'] if self.topkast else None
    params_b, rows, others = to_block_state(
      params, sstate[self.stored_key], self.block, *others, counts=self.counts, first=first
    )
    sstate_b = {k: v for k, v in sstate.items() if k not in ('masks', 'backward')}
    sstate_b['rows'] = rows
    if self.topkast:
      sstate_b['theta'] = self.rule.as_tree(self.rule.per_layer(params))
      sstate_b['forward_blocks'] = jax.tree.map(jnp.int32, self.forward)
    return sstate_b, params_b, *others

  def unpack(self, sstate_b: dict[str, Any], params_b: Any, *others: Any) -> tuple:
    """The inverse of `pack` (`unpack_state`)."""
    return unpack_state(sstate_b, params_b, self.shapes, self.block, self.forward, *others)

  def masked_sstate(self, sstate_b: dict[str, Any]) -> dict[str, Any]:
    """The sparsity state with the masks rebuilt from 'rows' (for metrics and summaries)."""
    masks = set_masks(sstate_b['rows'], self.shapes, self.block, self.forward)
    return {**{k: v for k, v in sstate_b.items() if k != 'rows'}, **masks}

  def init(self, params: Any, rng: jax.Array) -> tuple[dict[str, Any], Any]:
    """The rule's exact-count balanced masks, packed: (sstate with 'rows', block params)."""
    return self.pack(*self.rule.init(params, rng))

  def execute(self, sstate: dict[str, Any]) -> contextlib.ExitStack:
    """Block-sparse layers; for GSE inside its capture (Flax runs the interceptor entered last
    first, and the block-sparse one does not call the layer it replaces)."""
    stack = contextlib.ExitStack()
    if self.needs_aux:
      stack.enter_context(self.rule.capture())
    stack.enter_context(block_execution(sstate['rows'], forward=self.forward))
    return stack

  def capture(self) -> contextlib.AbstractContextManager:
    """Nothing: `execute` captures GSE's inputs and output gradients."""
    return contextlib.nullcontext()

  def zero_perturbations(self, model, variables: Any, *args, **kwargs) -> Any:
    """GSE's zero 'perturbations' (output-shaped), traced with the block params under execution
    of zero rows of the stored shapes (only shapes are read)."""
    rows = jax.tree.map(
      lambda v, k: None if k is None else jnp.zeros((v.shape[0], k), jnp.int32),
      variables['params'],
      self.counts,
      is_leaf=lambda x: x is None,
    )
    capture = lambda: self.execute({'rows': rows})
    return gse_lib.zero_perturbations(model, capture, variables, *args, **kwargs)

  def forward_params(self, sstate: dict[str, Any], params: Any) -> Any:
    """The stored blocks are the forward weights (run them under `execute`)."""
    del sstate
    return params

  def _penalty_weights(self) -> list[jax.Array]:
    """Top-KAST's penalty weights of the stored blocks (C, K_B, bi, bo): 1 on A (the first
    blocks of each column), 1/D on B minus A, as `TopKAST._penalty_weights`."""
    out = []
    for layer, k_a, k_b in zip(
      self.layers,
      self.rule.per_layer(self.forward),
      self.rule.per_layer(self.counts),
      strict=True,
    ):
      w = jnp.where(jnp.arange(k_b) < k_a, 1.0, 1.0 / (1.0 - layer.sparsity))  # (K_B,)
      out.append(w[None, :, None, None])
    return out

  def param_grads(self, sstate: dict[str, Any], params: Any, g_fwd: Any) -> Any:
    """The blocks' gradients (Top-KAST: plus the exploration penalty's gradient)."""
    del sstate
    if not self.topkast:
      return g_fwd
    reg = [
      g + (2.0 * self.rule.penalty) * w * p
      for g, w, p in zip(
        self.rule.per_layer(g_fwd),
        self._penalty_weights(),
        self.rule.per_layer(params),
        strict=True,
      )
    ]
    return self.rule.as_tree(reg, base=g_fwd)

  def mask_updates(self, sstate: dict[str, Any], updates: Any) -> Any:
    del sstate
    return updates

  def loss_penalty(self, sstate: dict[str, Any], params: Any) -> jax.Array:
    del sstate
    if not self.topkast:
      return jnp.zeros((), jnp.float32)
    terms = [
      jnp.sum(w * jnp.square(p))
      for w, p in zip(self._penalty_weights(), self.rule.per_layer(params), strict=True)
    ]
    return self.rule.penalty * sum(terms, jnp.zeros((), jnp.float32))

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
    block params `params_before` expanded: the gradient masked execution hands the rule. Only
    RigL grows by it; the other rules get the blocks' gradient `g_fwd` expanded (zero outside
    the stored blocks), which they use only to skip an update on a non-finite step; GSE's
    `aux` is its own (the layers' captured inputs and output gradients, `GSE.capture`).
    """
    if not self.rule.updates_masks or not self.layers:
      return sstate, params, opt_state
    if aux is None:
      raise ValueError('block-sparse updates need aux=(dense_grad, params_before), GSE its own')
    step = jnp.asarray(step, jnp.int32)

    def run(operands):
      sstate_b, params_b, opt_state = operands
      expand = lambda tree: to_masked_state(tree, sstate_b['rows'], self.shapes)[0]
      rule_aux = aux if self.needs_aux else None
      if isinstance(self.rule, RigL):
        dense_grad, params_before = aux
        g = dense_grad(expand(params_before))
      else:
        g = expand(g_fwd)
      sstate, params, opt_state = self.unpack(sstate_b, params_b, opt_state)
      return self.pack(*self.rule.update(sstate, params, g, opt_state, step, rng, rule_aux))

    return jax.lax.cond(
      self.rule.schedule.is_update(step), run, lambda o: o, (sstate, params, opt_state)
    )
