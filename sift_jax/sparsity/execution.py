"""How a rule's sparse kernels are stored and run: `Masked` or `BlockSparse` (sparsity.execution).

A rule decides which weights are active (sift_jax.sparsity.rules); its execution, chosen where
the rule is made, holds the state in one layout and runs the step on it:

  masked        params: dense kernels; sstate (rules.MaskState): bool masks ('masks',
                Top-KAST's 'backward')
  block_sparse  params: the kernels' active blocks (C, K, bi, bo); sstate (BlockState): their
                block-rows 'rows' (sift_jax.sparse_layers), Top-KAST also a frozen dense 'theta'

Both offer the rule's step (`init`, `forward_params`, `context`, `param_grads`,
`restrict_updates`, `update_masks`) and the conversions to and from the masked form, so a state
written under one resumes under the other (`convert_state`). An execution reads what it needs
from the rule's facts (`needs_dense_grad`, `trained_key` and `trained_blocks`, `penalty_weights`,
`keeps_inactive`, `needs_aux`) and never its type.

`sparse_apply` is the step's sparse part, shared by the trainer and `wrap_optax`:

  grads = rule.param_grads(sstate, params, g_fwd)      # onto params, penalty gradient added
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, rule.restrict_updates(sstate, updates))
  sstate, params, opt_state = rule.update_masks(sstate, params, g_fwd, opt_state, step, ...)

Block-sparse execution. Gradients and optimizer state exist only for the stored blocks. On an
update step (inside the jitted step, under lax.cond) the state is expanded to the masked form,
the rule updates masks, params and optimizer state exactly as under masked execution, and the
result is packed back with the same K per block-column, so shapes never change and nothing
recompiles. A rule that grows by the dense gradient (RigL) gets it from `grow_grad`, a masked
forward and backward of the pre-step weights on the step's batch computed in that branch only:
one dense gradient per dT steps; the others get the blocks' gradient expanded (zero outside the
stored blocks), which they use only to skip an update on a non-finite step.

A rule whose trained set is a superset of its forward set (Top-KAST: B contains A) stores the
trained set's blocks, the forward set's first in each block-column: the forward and the input
gradient run A's blocks, the weight gradient is computed for B's (`forward_prefix_matmul`), the
penalty acts on the stored blocks. Its dense theta (weights outside B keep their values) is
'theta' in the state: a frozen dense copy of each sparse kernel that the plain step passes
through untouched (the state is donated) and that only an update step reads and rewrites.
Memory per sparse kernel: theta (1x the dense kernel) + B's blocks with their gradient and
optimizer state, against masked Top-KAST's dense kernel, dense gradient and dense optimizer
state (3-4x the kernel with Adam).

Rules that keep balanced masks run block-sparse (`Rule.keeps_balance`: static, set, rigl,
topkast and gse; gmp raises); convolutions have no block-sparse layer: they raise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sift_jax.registry import EXECUTIONS
from sift_jax.sparse_layers import (
  block_execution,
  check_balanced,
  check_dense_kernel,
  to_block_state,
  to_masked_state,
)
from sift_jax.sparse_layers.block import rows_mask
from sift_jax.sparsity import rules


def _is_none(x: Any) -> bool:
  return x is None


def _count(m: jax.Array) -> jax.Array:
  return jnp.sum(m, dtype=jnp.int32)


@flax.struct.dataclass
class BlockState:
  """A rule's state under block-sparse execution; the field names are the checkpoints' keys."""

  rows: Any  # int32 (C, K): block-rows of each sparse kernel's stored blocks, None elsewhere
  ever: Any  # bool, params-shaped: positions ever active (as in rules.MaskState)
  churn: jax.Array
  key: jax.Array
  updates: jax.Array


@flax.struct.dataclass
class PrefixBlockState(BlockState):
  """With a forward prefix (Top-KAST): the frozen dense theta and A's blocks per column."""

  theta: Any
  forward_blocks: Any


def _shared(sstate: Any) -> dict[str, Any]:
  """The fields every layout holds alike."""
  return {'ever': sstate.ever, 'churn': sstate.churn, 'key': sstate.key, 'updates': sstate.updates}


class Execution:
  """The layout of a rule's state and the step on it; `Masked` is the reference."""

  name = ''

  def __init__(self, rule: rules.Rule) -> None:
    self.rule = rule

  @property
  def needs_dense_grad(self) -> bool:
    """Whether `update_masks` needs `grow_grad` (the trainer then supplies a dense gradient)."""
    return False

  def penalty_sets(self, sstate: rules.State) -> tuple[list[Any], list[Any]]:
    """Per sparse layer, membership of the forward and the trained set in the params' layout."""
    raise NotImplementedError

  def penalty_weights(self, sstate: rules.State) -> list[jax.Array] | None:
    """The rule's per-weight penalty weights in the params' layout; None without a penalty."""
    if self.rule.penalty is None:
      return None
    forward, trained = self.penalty_sets(sstate)
    return [
      self.rule.penalty_weights(layer, f, t)
      for layer, f, t in zip(self.rule.layers, forward, trained, strict=True)
    ]

  def param_grads(self, sstate: rules.State, params: Any, g_fwd: Any) -> Any:
    """g_fwd plus the penalty's gradient (2 lambda w theta), on the trained set."""
    weights = self.penalty_weights(sstate)
    if weights is not None:
      rule = self.rule
      reg = [
        g + (2.0 * rule.penalty) * w * p
        for g, w, p in zip(rule.per_layer(g_fwd), weights, rule.per_layer(params), strict=True)
      ]
      g_fwd = rule.as_tree(reg, base=g_fwd)
    return self.restrict_updates(sstate, g_fwd)

  def loss_penalty(self, sstate: rules.State, params: Any) -> jax.Array:
    """lambda * sum(w theta^2): the penalty whose gradient `param_grads` adds."""
    weights = self.penalty_weights(sstate)
    if weights is None:
      return jnp.zeros((), jnp.float32)
    terms = [
      jnp.sum(w * jnp.square(p)) for w, p in zip(weights, self.rule.per_layer(params), strict=True)
    ]
    return self.rule.penalty * sum(terms, jnp.zeros((), jnp.float32))


@EXECUTIONS.register('masked')
class Masked(Execution):
  """Dense kernels and bool masks: the forward pass uses the masked weights."""

  name = 'masked'

  def init(self, params: Any, rng: jax.Array) -> tuple[rules.State, Any]:
    """Initial masks with exact counts; returns (sstate, params masked and optionally rescaled)."""
    rule = self.rule
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    key = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    entries = rule.initial_masks(params, jax.random.fold_in(key, 1))
    sstate = rule.state_type(
      **entries,
      ever=entries['masks'],
      churn=jnp.zeros((), jnp.float32),
      key=jax.random.key_data(jax.random.fold_in(key, 2)),
      updates=jnp.zeros((), jnp.int32),
    )
    if rule.init_rescale:
      params = rule.map_masked(rules.rescale_fan_in, params, sstate.masks)
    return sstate, self.commit_params(sstate, params)

  def forward_params(self, sstate: rules.State, params: Any) -> Any:
    """The weights the forward pass uses: masked weights are exactly zero."""
    return self.rule.map_masked(
      lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, sstate.masks
    )

  def commit_params(self, sstate: rules.State, params: Any) -> Any:
    """The params after init or a mask update: inactive weights 0 (regrown ones start at 0),
    unless the rule keeps them (Top-KAST's theta)."""
    return params if self.rule.keeps_inactive else self.forward_params(sstate, params)

  def context(self, sstate: rules.State) -> contextlib.AbstractContextManager:
    del sstate
    return self.rule.capture()

  def shape_context(self, variables: Any) -> Callable[[], contextlib.AbstractContextManager]:
    """The context in which the model's shapes are traced (GSE's zero perturbations)."""
    del variables
    return self.rule.capture

  def penalty_sets(self, sstate):
    rule = self.rule
    return rule.per_layer(sstate.masks), rule.per_layer(getattr(sstate, rule.trained_key))

  def restrict_updates(self, sstate: rules.State, updates: Any) -> Any:
    return self.rule.map_masked(
      lambda u, m: jnp.where(m, u, jnp.zeros_like(u)),
      updates,
      getattr(sstate, self.rule.trained_key),
    )

  def update_masks(
    self, sstate, params, g_fwd, opt_state, step, rng=None, aux=None, grow_grad=None
  ):
    """Runs the rule's `new_masks` when the schedule says so and the gradients are finite.

    Finite means a finite global norm (no NaN or Inf, and no overflowing norm): the trainer logs
    the same norm, so XLA computes it once, where a separate isfinite pass over every gradient
    would cost ~5% of a small model's step. `g_fwd` is the dense gradient (`grow_grad` unused).

    Randomness is `rng` (or the state's key) folded with the step, so every device draws the
    same masks. Static shapes throughout: the step compiles once.
    """
    del grow_grad
    rule = self.rule
    if not rule.changes_masks or not rule.layers:
      return sstate, params, opt_state
    step = jnp.asarray(step, jnp.int32)
    finite = jnp.isfinite(optax.global_norm(g_fwd))
    base = sstate.key if rng is None else rng
    if jax.dtypes.issubdtype(base.dtype, jax.dtypes.prng_key):
      base = jax.random.key_data(base)
    key = jax.random.fold_in(jax.random.wrap_key_data(base), step)

    def run(operands):
      sstate, params, opt_state = operands
      return self._commit(sstate, params, g_fwd, opt_state, step, key, aux)

    return jax.lax.cond(
      rule.schedule.is_update(step) & finite, run, lambda o: o, (sstate, params, opt_state)
    )

  def _commit(self, sstate, params, g_fwd, opt_state, step, key, aux):
    """Runs new_masks (new state fields, at least 'masks') and commits them."""
    rule = self.rule
    new = rule.new_masks(sstate, params, g_fwd, step, key, aux)
    old_masks = rule.per_layer(sstate.masks)
    masks = rule.per_layer(new['masks'])
    left = sum(_count(o & ~m) for o, m in zip(old_masks, masks, strict=True))
    before = sum(_count(o) for o in old_masks)
    # Positions entering the trained set start with zero optimizer state (RigL's regrown
    # weights; Top-KAST's new members of B), so nothing accumulated outside it leaks in.
    entered = [
      n & ~o
      for o, n in zip(
        rule.per_layer(getattr(sstate, rule.trained_key)),
        rule.per_layer(new[rule.trained_key]),
        strict=True,
      )
    ]
    sstate = sstate.replace(
      **new,
      ever=rule.as_tree([e | m for e, m in zip(rule.per_layer(sstate.ever), masks, strict=True)]),
      churn=left / jnp.maximum(before, 1).astype(jnp.float32),
      updates=sstate.updates + 1,
    )
    return sstate, self.commit_params(sstate, params), rule.zero_opt_state(opt_state, entered)

  def masked_sstate(self, sstate: rules.MaskState) -> rules.MaskState:
    """The state in masked form (for metrics and summaries): itself."""
    return sstate

  def to_masked(self, sstate: rules.State, params: Any, *others: Any) -> tuple:
    """(sstate, params, others...) in masked form: themselves."""
    return sstate, params, *others

  def from_masked(self, sstate: rules.State, params: Any, *others: Any) -> tuple:
    """The inverse of `to_masked`: themselves."""
    return sstate, params, *others

  def check_masked(self, sstate: rules.State) -> None:
    """Whether a concrete masked state fits this layout: any masks do."""
    del sstate


@EXECUTIONS.register('block_sparse')
class BlockSparse(Execution):
  """Sparse Dense kernels stored as their active blocks; masks only inside update steps."""

  name = 'block_sparse'

  def __init__(self, rule: rules.Rule) -> None:
    super().__init__(rule)
    if not all(layer.balanced for layer in rule.layers):
      raise ValueError('block-sparse execution needs a balanced plan (make_rule sets it)')
    for layer in rule.layers:
      check_dense_kernel(layer.shape, layer.block, layer.name)
    blocks = {layer.block for layer in rule.layers}
    if len(blocks) > 1:
      raise ValueError(f'one block shape per model, got {sorted(blocks)}')
    self.block = blocks.pop() if blocks else (1, 1)
    self.masked = Masked(rule)  # runs the rule on the expanded state of update steps
    # The trained set is stored; a forward set inside it (Top-KAST's A in B) is its prefix.
    self.prefix = rule.trained_key != 'masks'
    if self.prefix != rule.keeps_inactive:
      raise ValueError(
        f'sparsity.rule={rule.name()!r}: block-sparse execution keeps the weights outside the '
        'stored blocks (theta) exactly when the trained set extends the forward set'
      )
    forward = [layer.active_blocks // layer.columns for layer in rule.layers]
    self.forward = rule.as_tree(forward) if self.prefix else None
    self.counts = rule.as_tree(
      [k // layer.columns for layer, k in zip(rule.layers, rule.trained_blocks, strict=True)]
    )
    self.shapes = jax.tree.unflatten(
      rule.treedef, [jax.ShapeDtypeStruct(s, jnp.float32) for s in rule.shapes]
    )

  @property
  def needs_dense_grad(self) -> bool:
    return self.rule.needs_dense_grad and self.rule.changes_masks and bool(self.rule.layers)

  # ----- conversions
  def from_masked(self, sstate: rules.State, params: Any, *others: Any) -> tuple:
    """Masked (sstate, params, others...) -> block-sparse: the trained set becomes 'rows'."""
    rule = self.rule
    first = sstate.masks if self.prefix else None
    params_b, rows, others = to_block_state(
      params,
      getattr(sstate, rule.trained_key),
      self.block,
      *others,
      counts=self.counts,
      first=first,
    )
    if not self.prefix:
      return BlockState(rows=rows, **_shared(sstate)), params_b, *others
    sstate_b = PrefixBlockState(
      rows=rows,
      theta=rule.as_tree(rule.per_layer(params)),
      forward_blocks=jax.tree.map(jnp.int32, self.forward),
      **_shared(sstate),
    )
    return sstate_b, params_b, *others

  def to_masked(self, sstate_b: BlockState, params_b: Any, *others: Any) -> tuple:
    """The inverse of `from_masked` (`unpack_state`)."""
    return unpack_state(sstate_b, params_b, self.shapes, self.block, self.forward, *others)

  def check_masked(self, sstate: rules.State) -> None:
    """Raises ValueError unless a concrete masked state's sets are whole blocks with this plan's
    K per block-column (a masked run resumes block-sparse only if its plan was balanced)."""
    rule = self.rule
    checks = [(rule.trained_key, self.counts)]
    if self.prefix:
      checks.append(('masks', self.forward))
    for key, counts in checks:
      masks = rule.per_layer(getattr(sstate, key))
      for layer, m, k in zip(rule.layers, masks, rule.per_layer(counts), strict=True):
        try:
          found = check_balanced(m, self.block)
        except ValueError as e:
          raise ValueError(f'{layer.name}: {e}; it cannot resume block-sparse') from None
        if found != k:
          raise ValueError(
            f'{layer.name}: the checkpoint has {found} active blocks per block-column in '
            f"'{key}', the block-sparse plan {k}; it cannot resume block-sparse"
          )

  def masked_sstate(self, sstate_b: BlockState) -> rules.MaskState:
    """The sparsity state with the masks rebuilt from 'rows' (for metrics and summaries)."""
    return masked_state(sstate_b, self.shapes, self.block, self.forward)

  # ----- the step
  def init(self, params: Any, rng: jax.Array) -> tuple[rules.State, Any]:
    """The rule's exact-count balanced masks, packed: (sstate with 'rows', block params)."""
    return self.from_masked(*self.masked.init(params, rng))

  def context(self, sstate: rules.State) -> contextlib.ExitStack:
    """Block-sparse layers; for GSE inside its capture (Flax runs the interceptor entered last
    first, and the block-sparse one does not call the layer it replaces)."""
    return self._rows_context(sstate.rows)

  def _rows_context(self, rows: Any) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(self.rule.capture())
    stack.enter_context(block_execution(rows, forward=self.forward))
    return stack

  def shape_context(self, variables: Any) -> Callable[[], contextlib.AbstractContextManager]:
    """`context` with zero rows of the stored shapes (only shapes are read)."""
    rows = jax.tree.map(
      lambda v, k: None if k is None else jnp.zeros((v.shape[0], k), jnp.int32),
      variables['params'],
      self.counts,
      is_leaf=_is_none,
    )
    return lambda: self._rows_context(rows)

  def forward_params(self, sstate: rules.State, params: Any) -> Any:
    """The stored blocks are the forward weights (run them under `context`)."""
    del sstate
    return params

  def penalty_sets(self, sstate):
    """The stored blocks (C, K_B, bi, bo) are all trained; A's are the first of each column."""
    del sstate
    rule = self.rule
    forward = [
      (jnp.arange(k_b) < k_a)[None, :, None, None]
      for k_a, k_b in zip(rule.per_layer(self.forward), rule.per_layer(self.counts), strict=True)
    ]
    return forward, [True] * len(rule.layers)

  def restrict_updates(self, sstate: rules.State, updates: Any) -> Any:
    """Only the trained blocks are stored: nothing to zero."""
    del sstate
    return updates

  def update_masks(
    self, sstate, params, g_fwd, opt_state, step, rng=None, aux=None, grow_grad=None
  ):
    """The rule's update on block-sparse state (after the optimizer step, as masked execution).

    `grow_grad()`: the task-loss gradient w.r.t. the pre-step weights in masked form, on the
    step's batch (`sparse_apply` builds it), called on update steps only and only for a rule
    that `needs_dense_grad`; GSE's `aux` is its captured layer inputs and output gradients.
    """
    rule = self.rule
    if not rule.changes_masks or not rule.layers:
      return sstate, params, opt_state
    if self.needs_dense_grad and grow_grad is None:
      raise ValueError(f'sparsity.rule={rule.name()!r} runs block-sparse only with grow_grad')
    step = jnp.asarray(step, jnp.int32)

    def run(operands):
      sstate_b, params_b, opt_state = operands
      if self.needs_dense_grad:
        g = grow_grad()
      else:
        g = to_masked_state(g_fwd, sstate_b.rows, self.shapes)[0]
      sstate, params, opt_state = self.to_masked(sstate_b, params_b, opt_state)
      new = self.masked.update_masks(sstate, params, g, opt_state, step, rng, aux)
      return self.from_masked(*new)

    return jax.lax.cond(
      rule.schedule.is_update(step), run, lambda o: o, (sstate, params, opt_state)
    )

  def masked_params(self, sstate_b: BlockState, params_b: Any) -> Any:
    """Block params expanded to dense kernels (zero outside the stored blocks)."""
    return to_masked_state(params_b, sstate_b.rows, self.shapes)[0]


def set_masks(rows: Any, shapes: Any, block: tuple[int, int], forward: Any = None) -> dict:
  """The masks of block-sparse rows: {'masks'}, or with `forward` (the forward set's static
  count of blocks per column, a rows-shaped tree of ints) {'masks': A, 'backward': B}."""

  def masks(count=lambda *k: None):
    return jax.tree.map(
      lambda r, s, *k: None if r is None else rows_mask(r[:, : count(*k)], s.shape, block),
      rows,
      shapes,
      *([] if forward is None else [forward]),
      is_leaf=_is_none,
    )

  if forward is None:
    return {'masks': masks()}
  return {'masks': masks(int), 'backward': masks()}


def masked_state(
  sstate_b: BlockState, shapes: Any, block: tuple[int, int], forward: Any
) -> rules.MaskState:
  """The masked-form state of a block-sparse one: the masks rebuilt from 'rows' (`set_masks`),
  a TopKASTState with a forward prefix."""
  state_type = rules.MaskState if forward is None else rules.TopKASTState
  return state_type(**set_masks(sstate_b.rows, shapes, block, forward), **_shared(sstate_b))


def unpack_state(
  sstate_b: BlockState,
  params_b: Any,
  shapes: Any,
  block: tuple[int, int],
  forward: Any,
  *others: Any,
) -> tuple[Any, ...]:
  """Block-sparse (sstate, params, others...) -> masked; the inverse of `from_masked`.

  `shapes`: a params-shaped tree of the dense shapes; `forward` as in `set_masks`. Weights
  outside the stored blocks are zero, or with a forward prefix theta's frozen values.
  """
  params, stored, others = to_masked_state(params_b, sstate_b.rows, shapes, *others)
  if forward is not None:
    params = jax.tree.map(
      lambda p, m, t: p if m is None else jnp.where(m, p, t),
      params,
      stored,
      sstate_b.theta,
      is_leaf=_is_none,
    )
  return masked_state(sstate_b, shapes, block, forward), params, *others


def convert_state(state: Any, source: Execution, target: Execution, check: bool = True) -> Any:
  """A TrainState written under execution `source`, in `target`'s layout (a checkpoint of one
  mode resuming in the other); the same state when both have the same layout. With `check`,
  converting to block-sparse checks the concrete masks (`BlockSparse.check_masked`); without,
  it runs on abstract states too (jax.eval_shape)."""
  if source.name == target.name:
    return state
  sstate, params, opt_state = source.to_masked(state.sparsity, state.params, state.opt_state)
  if check:
    target.check_masked(sstate)
  sstate, params, opt_state = target.from_masked(sstate, params, opt_state)
  return state.replace(params=params, opt_state=opt_state, sparsity=sstate)


def sparse_apply(
  rule: rules.Rule,
  tx: optax.GradientTransformation,
  sstate: rules.State,
  params: Any,
  opt_state: Any,
  g_fwd: Any,
  step: jax.Array,
  rng: jax.Array | None = None,
  aux: Any = None,
  dense_grad: Callable[[Any], Any] | None = None,
) -> tuple[rules.State, Any, Any]:
  """One optimizer step of the sparse params and the mask update: (sstate, params, opt_state).

  `g_fwd` are the gradients w.r.t. `rule.forward_params(sstate, params)`; `aux` GSE's captured
  layer inputs and output gradients; `dense_grad(weights)` the task-loss gradient w.r.t.
  masked-form weights on the step's batch, needed when `rule.execution.needs_dense_grad`
  (block-sparse RigL calls it on update steps only, with the pre-step weights).
  """
  grow_grad = None
  if dense_grad is not None:
    grow_grad = lambda: dense_grad(rule.execution.masked_params(sstate, params))
  grads = rule.param_grads(sstate, params, g_fwd)
  updates, opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, rule.restrict_updates(sstate, updates))
  return rule.update_masks(sstate, new_params, g_fwd, opt_state, step, rng, aux, grow_grad)
