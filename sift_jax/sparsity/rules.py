"""The mask-update rules of docs/methods.md section 3: dense, static, set, rigl, topkast, gse, gmp.

A rule is a small object of pure functions over pytrees (optax style). Static facts (which
leaves are sparse, their shapes and exact active counts, the schedules) live on the object;
everything that changes lives in `sstate`, a `MaskState` (Top-KAST: `TopKASTState`) of arrays
checkpointed with the params, whose field names are the checkpoints' keys. In its masked form
(sift_jax.sparsity.execution has the block-sparse one):

  masks     params-shaped tree, bool mask per sparse leaf, None for dense leaves (Top-KAST: set A)
  ever      the same shape: positions ever active (for `sparsity/itop`)
  churn     fraction of the active weights that left at the last update
  key       uint32 key data; update randomness is this key folded with the step
  updates   number of mask updates done (a count: the name is the checkpoints')
  backward  Top-KAST only: set B, the same shape as masks

A new rule subclasses `Rule`, implements `new_masks` and registers itself in `registry.RULES`;
each rule also states its training FLOPs per example (`training_flops`, docs/methods.md section 1).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Mapping
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sift_jax.registry import EXECUTIONS, RULES
from sift_jax.sparsity import gse, select
from sift_jax.sparsity.plan import Layer, check_level, exact_count, fill_densities, path_of
from sift_jax.sparsity.schedules import DropSchedule, UpdateSchedule, cubic_counts, end_step

Densities = Mapping[tuple[str, ...], float]
# A rule's state: a MaskState (TopKASTState) under masked execution, an execution.BlockState
# (PrefixBlockState) under block-sparse execution.
State = Any


class FlopCounts(Protocol):
  """What a rule's training-FLOP accounting reads of a model's FLOP report (sift_jax.flops)."""

  forward_dense: float

  def at_densities(self, densities: Densities) -> float: ...


def _is_none(x: Any) -> bool:
  return x is None


def _abs_blocks(x: jax.Array, layer: Layer) -> jax.Array:
  return select.to_blocks(jnp.abs(x.astype(jnp.float32)), layer.block, 'sum')


def _topk(scores: jax.Array, k, layer: Layer, valid: jax.Array | None = None) -> jax.Array:
  """Top-k blocks of a weight-shaped score by block sums, as a weight-shaped mask.

  A balanced layer takes k / columns blocks in every output block-column (k a multiple of
  `layer.columns`, see `_column_multiple`).
  """
  vb = None if valid is None else select.to_blocks(valid, layer.block, 'any')
  sb = _abs_blocks(scores, layer)
  if layer.balanced:
    return select.from_blocks(select.balanced_topk_mask(sb, k // layer.columns, vb), layer.block)
  return select.from_blocks(select.topk_mask(sb, k, vb), layer.block)


def _random(key: jax.Array, layer: Layer, k, valid: jax.Array | None = None) -> jax.Array:
  """k blocks uniformly at random among `valid` (balanced: k / columns per block-column)."""
  vb = None if valid is None else select.to_blocks(valid, layer.block, 'any')
  shape = select.to_blocks(jnp.zeros(layer.shape, bool), layer.block, 'any').shape
  if layer.balanced:
    return select.from_blocks(
      select.balanced_random_mask(key, shape, k // layer.columns, vb), layer.block
    )
  return select.from_blocks(select.random_mask(key, shape, k, vb), layer.block)


def _column_multiple(count, layer: Layer):
  """A block count rounded to a multiple of the block-columns when the layer is balanced."""
  if not layer.balanced:
    return count
  if isinstance(count, int):
    return layer.columns * round(count / layer.columns)
  return layer.columns * jnp.round(count / layer.columns).astype(jnp.int32)


def _count(m: jax.Array) -> jax.Array:
  return jnp.sum(m, dtype=jnp.int32)


@flax.struct.dataclass
class MaskState:
  """A rule's state in masked form; the field names are the checkpoints' keys (orbax restores
  by them), so none is renamed and none is optional (a None field would not restore)."""

  masks: Any  # bool, params-shaped, None at dense leaves (Top-KAST: the forward set A)
  ever: Any  # the same shape: positions ever active
  churn: jax.Array  # float32: fraction of the active weights that left at the last update
  key: jax.Array  # uint32 key data, folded with the step for each update
  updates: jax.Array  # int32: mask updates done


@flax.struct.dataclass
class TopKASTState(MaskState):
  """Top-KAST's state: also the backward set B (A inside B)."""

  backward: Any


def rescale_fan_in(p: jax.Array, m: jax.Array) -> jax.Array:
  """Scales each output unit by sqrt(fan_in / its active fan-in), keeping the init's variance."""
  fan_in = int(np.prod(p.shape[:-1]))
  active = jnp.sum(m, axis=tuple(range(p.ndim - 1)), dtype=jnp.float32)  # (O,)
  return p * jnp.sqrt(fan_in / jnp.maximum(active, 1.0)).astype(p.dtype)


class Rule:
  """Base rule: masks fixed after init (this is `static`); subclasses change the masks.

  A rule decides which weights are active; its `execution` (sift_jax.sparsity.execution, chosen
  by the `execution` option) stores and runs them, masked or block-sparse, and is what `init`,
  `forward_params`, `param_grads`, `restrict_updates`, `update_masks`, `metrics` and `execute`
  go through. What an execution needs from a rule it reads from these facts:

    has_masks         False: the dense rule (no plan, sparsity.level 0)
    changes_masks     False: masks never change after init
    needs_aux         GSE: its update reads each layer's inputs and output gradients
    needs_dense_grad  RigL: it grows by the dense gradient (block-sparse execution computes one
                      on update steps only)
    trained_key       the state field of the set the optimizer moves ('masks', or Top-KAST's
                      stored backward set 'backward'); `trained_blocks` its blocks per layer;
                      `state_type` the state's class
    keeps_inactive    Top-KAST: weights outside the trained set keep their values (dense theta)
    penalty           Top-KAST: lambda of the regulariser with per-weight `penalty_weights`
    keeps_balance     the rule keeps balanced (per-column) masks, so it runs block-sparse

  Options are keyword arguments (`Rule(shapes, layers, total_steps=..., update_every_steps=...)`)
  named as the keys of the config's `sparsity` group; `from_config` reads them from a run config.
  """

  has_masks = True
  changes_masks = True
  needs_aux = False
  needs_dense_grad = False
  trained_key = 'masks'
  state_type: type[MaskState] = MaskState
  keeps_inactive = False
  penalty: float | None = None
  keeps_balance = False
  # Set by build_rule: what `sparsity.with_execution` rebuilds the rule from.
  build_args: tuple[str, Any, Any, dict[str, Any]] | None = None
  # The config keys that set the update window, for messages.
  every_key = 'sparsity.update_every_steps'
  end_key = 'sparsity.end_fraction * total_steps'

  def __init__(
    self,
    params_shapes: Any,
    layers: list[Layer],
    *,
    total_steps: int,
    update_every_steps: int = 100,
    start_step: int = 0,
    end_fraction: float = 0.75,
    drop_fraction: float = 0.3,
    drop_schedule: str = 'cosine',
    drop_decay: float = 0.1,
    regrow_dropped: bool = True,
    init_rescale: bool = False,
    execution: str = 'masked',
  ) -> None:
    self.layers = layers
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(params_shapes)
    self.paths = [path_of(kp) for kp, _ in flat]
    self.shapes = [tuple(leaf.shape) for _, leaf in flat]
    self.total_steps = int(total_steps)
    end = end_step(self.total_steps, end_fraction)
    self.schedule = UpdateSchedule(int(update_every_steps), int(start_step), end)
    self.drop = DropSchedule(drop_schedule, float(drop_fraction), end, float(drop_decay))
    self.regrow_dropped = bool(regrow_dropped)
    self.init_rescale = bool(init_rescale)
    if not self.keeps_balance and any(layer.balanced for layer in layers):
      raise ValueError(
        f'sparsity.rule={self.name()!r} cannot keep balanced masks (sparsity.balanced or '
        f'sparsity.execution=block_sparse); allowed: {", ".join(balanced_rules())}'
      )
    self._execution_type = EXECUTIONS.get(execution)

  @functools.cached_property
  def execution(self) -> Any:
    """The execution (sift_jax.sparsity.execution) storing and running this rule's state; made
    on first use, once a subclass's __init__ has set what it reads (Top-KAST's B)."""
    return self._execution_type(self)

  @classmethod
  def options(cls) -> dict[str, Any]:
    """The rule's keyword options (config `sparsity` keys) and their defaults."""
    out = {}
    for klass in reversed(cls.__mro__):
      if '__init__' in vars(klass) and issubclass(klass, Rule):
        params = inspect.signature(klass.__init__).parameters.values()
        out.update({p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY})
    return out

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, params_shapes: Any, layers: list[Layer]
  ) -> Rule:
    """The rule with its options read from a run config (`sparsity` group and total_steps)."""
    s = config.sparsity
    names = set(cls.options()) - {'total_steps'}
    return cls(
      params_shapes,
      layers,
      total_steps=int(config.total_steps),
      **{k: s[k] for k in names if k in s},
    )

  @classmethod
  def name(cls) -> str:
    """The registered name, for messages (the class name for an unregistered rule)."""
    return next((n for n in RULES.names() if RULES.get(n) is cls), cls.__name__)

  def window(self) -> str:
    """The update window in words, naming the keys that set it."""
    return self.schedule.window(self.every_key, self.end_key)

  # ----- tree plumbing for subclasses: sparse leaves as lists aligned with self.layers
  def _leaves(self, tree: Any) -> list[Any]:
    return jax.tree.leaves(tree, is_leaf=_is_none)

  def per_layer(self, tree: Any) -> list[Any]:
    """The sparse layers' leaves of a params-shaped tree, in the order of self.layers."""
    leaves = self._leaves(tree)
    return [leaves[layer.index] for layer in self.layers]

  def as_tree(self, per_layer: list[Any], base: Any = None) -> Any:
    """Puts per-layer values into a params-shaped tree (None elsewhere, or `base`'s leaves)."""
    leaves = [None] * self.treedef.num_leaves if base is None else self._leaves(base)
    for layer, v in zip(self.layers, per_layer, strict=True):
      leaves[layer.index] = v
    return jax.tree.unflatten(self.treedef, leaves)

  def map_masked(self, fn, tree: Any, masks: Any) -> Any:
    """Applies fn(leaf, mask) to the sparse leaves of a params-shaped tree."""
    new = [fn(x, m) for x, m in zip(self.per_layer(tree), self.per_layer(masks), strict=True)]
    return self.as_tree(new, base=tree)

  # ----- what the rule decides (masked form: bool masks the kernels' shapes)
  def initial_masks(self, params: Any, key: jax.Array) -> dict[str, Any]:
    """The initial state fields, at least 'masks', with the plan's exact counts (a dict)."""
    masks = [
      _random(jax.random.fold_in(key, layer.index), layer, layer.active_blocks)
      for layer in self.layers
    ]
    return {'masks': self.as_tree(masks)}

  def new_masks(self, sstate, params, g_fwd, step, key, aux) -> dict[str, Any]:
    """The state fields (a dict: at least 'masks') of a mask update; `g_fwd` is the dense
    gradient."""
    raise NotImplementedError(f'{type(self).__name__} changes masks but has no new_masks')

  @property
  def trained_blocks(self) -> list[int]:
    """Each layer's block count of the trained set (`trained_key`)."""
    return [layer.active_blocks for layer in self.layers]

  def penalty_weights(self, layer: Layer, forward: Any, trained: Any) -> jax.Array:
    """The weight of theta^2 in the penalty, from bool (or broadcastable) set memberships."""
    raise NotImplementedError(f'{type(self).__name__} has no penalty')

  def capture(self) -> contextlib.AbstractContextManager:
    """Context for the model's apply; only GSE captures anything (see gse.py)."""
    return contextlib.nullcontext()

  # ----- the step, through the execution (masked or block-sparse state)
  def init(self, params: Any, rng: jax.Array) -> tuple[State, Any]:
    """Initial masks with exact counts; returns (sstate, params as the execution stores them)."""
    return self.execution.init(params, rng)

  def forward_params(self, sstate: State, params: Any) -> Any:
    """The weights the forward pass uses (run the model inside `execute(sstate)`)."""
    return self.execution.forward_params(sstate, params)

  def execute(self, sstate: State) -> contextlib.AbstractContextManager:
    """The context the model's apply runs in (block-sparse layers, GSE's capture)."""
    return self.execution.context(sstate)

  def param_grads(self, sstate: State, params: Any, g_fwd: Any) -> Any:
    """Gradients w.r.t. the params from those w.r.t. the forward weights, on the trained set."""
    return self.execution.param_grads(sstate, params, g_fwd)

  def restrict_updates(self, sstate: State, updates: Any) -> Any:
    """Optimizer updates zeroed outside the trained set (after the optimizer: momentum and
    decoupled weight decay never move an inactive weight)."""
    return self.execution.restrict_updates(sstate, updates)

  def loss_penalty(self, sstate: State, params: Any) -> jax.Array:
    """The rule's regulariser, for reporting (`param_grads` already adds its gradient)."""
    return self.execution.loss_penalty(sstate, params)

  def update_masks(
    self,
    sstate: State,
    params: Any,
    g_fwd: Any,
    opt_state: Any,
    step: jax.Array,
    rng: jax.Array | None = None,
    aux: Any = None,
    grow_grad: Any = None,
  ) -> tuple[State, Any, Any]:
    """The mask update when the schedule says so (after the optimizer step, under lax.cond).

    `aux`: GSE's captured layer inputs and output gradients; `grow_grad`: a function returning
    the dense gradient (masked form) that block-sparse execution calls on update steps when
    `needs_dense_grad` (`sparse_apply` builds it). See `execution.Masked.update_masks`.
    """
    return self.execution.update_masks(sstate, params, g_fwd, opt_state, step, rng, aux, grow_grad)

  def metrics(self, sstate: State) -> dict[str, jax.Array]:
    """Density, churn and in-time over-parameterisation of the state (`mask_metrics`)."""
    return self.mask_metrics(self.execution.masked_sstate(sstate))

  def zero_perturbations(self, model, variables: Any, *args, **kwargs) -> Any:
    """GSE's zero 'perturbations' collection (output-shaped) for model.apply(variables, ...)."""
    return gse.zero_perturbations(
      model, self.execution.shape_context(variables), variables, *args, **kwargs
    )

  def zero_opt_state(self, opt_state: Any, entered: list[jax.Array]) -> Any:
    """Zeroes every optimizer-state leaf of a sparse weight at the positions in `entered`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    out = []
    for kp, leaf in flat:
      i = self._match(path_of(kp), tuple(getattr(leaf, 'shape', ())))
      out.append(leaf if i is None else jnp.where(entered[i], jnp.zeros_like(leaf), leaf))
    return jax.tree.unflatten(treedef, out)

  def _match(self, path: tuple[str, ...], shape: tuple[int, ...]) -> int | None:
    """Which sparse layer an optimizer-state leaf belongs to (its index in self.layers).

    Optax states mirror the params tree (mu, nu, trace, ...), so the leaf's path ends with its
    param's path: the longest such param of the same shape wins. A leaf matching no path is
    matched by shape only when that is unambiguous.
    """
    by_index = {layer.index: j for j, layer in enumerate(self.layers)}
    hits = [
      i
      for i, (p, s) in enumerate(zip(self.paths, self.shapes, strict=True))
      if s == shape and len(p) <= len(path) and path[len(path) - len(p) :] == p
    ]
    if hits:
      return by_index.get(max(hits, key=lambda i: len(self.paths[i])))
    same = [i for i, s in enumerate(self.shapes) if s == shape]
    if not any(i in by_index for i in same):
      return None
    if len(same) > 1:
      raise ValueError(
        f'optimizer state leaf {"/".join(path)} {shape} matches no param path and several '
        f'params by shape ({", ".join("/".join(self.paths[i]) for i in same)})'
      )
    return by_index[same[0]]

  def training_flops(self, report: FlopCounts, densities: Densities, step: int) -> float:
    """Training FLOPs per example at `step` with the forward masks at `densities` (docs/methods.md
    section 1): forward, input gradients and weight gradients each cost the forward FLOPs at
    the masks' density, 3 f_S. A rule whose step or update costs otherwise overrides this.
    Block-sparse execution computes the same products.

    `report` is a `sift_jax.flops.FlopReport` of the model (its `at_densities` and
    `forward_dense`); `densities` maps sparse kernel paths to their current density.
    """
    del step
    return 3.0 * report.at_densities(densities)

  def updating(self, step: int) -> bool:
    """Whether mask updates remain at or after `step`."""
    steps = self.schedule.steps()
    return bool(steps) and step <= steps[-1]

  def mask_metrics(self, sstate: State) -> dict[str, jax.Array]:
    """Global and per-layer density of the forward masks, churn and in-time over-parameterisation,
    from a masked-form state."""
    if not self.layers:
      return {'sparsity/density': jnp.ones((), jnp.float32)}
    masks = self.per_layer(sstate.masks)
    ever = self.per_layer(sstate.ever)
    total = float(sum(layer.size for layer in self.layers))
    out = {
      'sparsity/density': sum(_count(m) for m in masks) / total,
      'sparsity/churn': sstate.churn,
      'sparsity/itop': sum(_count(e) for e in ever) / total,
    }
    for layer, m in zip(self.layers, masks, strict=True):
      out[f'sparsity/density/{layer.name}'] = _count(m) / float(layer.size)
    return out


def balanced_rules() -> list[str]:
  """The registered rules that keep balanced masks (and so run block-sparse)."""
  return [n for n in RULES.names() if RULES.get(n).keeps_balance]


@RULES.register('dense')
class Dense(Rule):
  """No masks at all (the plan is empty)."""

  has_masks = False
  changes_masks = False

  def training_flops(self, report: FlopCounts, densities: Densities, step: int) -> float:
    """3 f_D."""
    del densities, step
    return 3.0 * report.forward_dense


@RULES.register('static')
class Static(Rule):
  """Random masks with exact counts, never updated."""

  changes_masks = False
  keeps_balance = True


class _DropGrow(Rule):
  """Drop the f_t fraction of active weights with the smallest |w|; grow as many elsewhere."""

  keeps_balance = True

  def new_masks(self, sstate, params, g_fwd, step, key, aux):
    del aux
    frac = self.drop(step)
    out = []
    for layer, m, p, g in zip(
      self.layers,
      self.per_layer(sstate.masks),
      self.per_layer(params),
      self.per_layer(g_fwd),
      strict=True,
    ):
      n_drop = _column_multiple(jnp.round(frac * layer.active_blocks).astype(jnp.int32), layer)
      if not self.regrow_dropped:
        n_drop = jnp.minimum(n_drop, layer.blocks - layer.active_blocks)
      keep = _topk(p, layer.active_blocks - n_drop, layer, valid=m)
      candidates = ~keep if self.regrow_dropped else ~m
      grow = self.grow_scores(layer, g, jax.random.fold_in(key, layer.index), candidates, n_drop)
      out.append(keep | grow)
    return {'masks': self.as_tree(out)}


@RULES.register('set')
class SET(_DropGrow):
  """SET: regrow uniformly at random among the candidates."""

  def grow_scores(self, layer, g, key, candidates, n):
    del g
    return _random(key, layer, n, candidates)


@RULES.register('rigl')
class RigL(_DropGrow):
  """RigL: regrow where |dL/dw| of the full masked weight on the current batch is largest."""

  needs_dense_grad = True

  def training_flops(self, report: FlopCounts, densities: Densities, step: int) -> float:
    """While updating, (3 f_S dT + 2 f_S + f_D) / (dT + 1): one step in dT + 1 computes the
    dense weight gradient it grows from; afterwards 3 f_S."""
    f_s = report.at_densities(densities)
    if not self.updating(step):
      return 3.0 * f_s
    dt = self.schedule.every
    return (3.0 * f_s * dt + 2.0 * f_s + report.forward_dense) / (dt + 1)

  def grow_scores(self, layer, g, key, candidates, n):
    del key
    return _topk(g, n, layer, valid=candidates)


@RULES.register('topkast')
class TopKAST(Rule):
  """Top-KAST: dense theta; forward set A, backward set B (A inside B), exploration penalty.

  `masks` hold A and `backward` holds B, both the top magnitudes of theta (one total order, so
  A is a prefix of B). Weights outside B keep their values and get no update. The penalty
  lambda (sum_A theta^2 + sum_{B minus A} theta^2 / D), D the forward density, enters through
  its gradient on B (`param_grads`); train/loss reports the task loss only.
  """

  every_key = 'sparsity.topkast_every_steps'
  end_key = 'total_steps'
  trained_key = 'backward'
  state_type = TopKASTState
  keeps_inactive = True
  keeps_balance = True

  def __init__(
    self,
    params_shapes: Any,
    layers: list[Layer],
    *,
    backward_level: float = 0.0,
    topkast_penalty: float = 1e-4,
    topkast_every_steps: int = 100,
    **options: Any,
  ) -> None:
    super().__init__(params_shapes, layers, **options)
    self.penalty = float(topkast_penalty)
    self.schedule = UpdateSchedule(
      int(topkast_every_steps), self.schedule.start, int(self.total_steps)
    )
    back = float(backward_level)
    check_level(back, 'sparsity.backward_level')
    # B's densities scale A's and are redistributed as ERK does where a layer would pass 1, so
    # the global backward density meets 1 - backward_level (uniform stays uniform, ERK is ERK).
    # A layer's B never falls below its A (make_rule refuses backward_level above level).
    sizes = np.array([layer.size for layer in layers], np.float64)
    dens = fill_densities(
      np.array([1.0 - layer.sparsity for layer in layers]), sizes, (1.0 - back) * sizes.sum()
    )
    self.backward_blocks = [
      max(
        layer.active_blocks,
        min(layer.blocks, _column_multiple(exact_count(d, layer.blocks), layer)),
      )
      for layer, d in zip(layers, dens, strict=True)
    ]

  @property
  def trained_blocks(self) -> list[int]:
    return self.backward_blocks

  def _sets(self, params):
    ps = self.per_layer(params)
    a = [_topk(p, layer.active_blocks, layer) for layer, p in zip(self.layers, ps, strict=True)]
    b = [
      _topk(p, k, layer) for layer, p, k in zip(self.layers, ps, self.backward_blocks, strict=True)
    ]
    return {'masks': self.as_tree(a), 'backward': self.as_tree(b)}

  def initial_masks(self, params, key):
    return self._sets(params)

  def penalty_weights(self, layer, forward, trained):
    """1 on A, 1/D on B minus A, 0 outside B."""
    return jnp.where(forward, 1.0, jnp.where(trained, 1.0 / (1.0 - layer.sparsity), 0.0))

  def new_masks(self, sstate, params, g_fwd, step, key, aux):
    return self._sets(params)

  def backward_densities(self) -> dict[tuple[str, ...], float]:
    """Each sparse kernel's density of the backward set B (static: B's counts are fixed)."""
    return {
      tuple(layer.name.split('/')): k * layer.block_size / layer.size
      for layer, k in zip(self.layers, self.backward_blocks, strict=True)
    }

  def training_flops(self, report: FlopCounts, densities: Densities, step: int) -> float:
    """f_A forward + f_A input gradients + f_B weight gradients (B is trained, A runs)."""
    del step
    return 2.0 * report.at_densities(densities) + report.at_densities(self.backward_densities())

  def mask_metrics(self, sstate):
    out = super().mask_metrics(sstate)
    if self.layers:
      back = self.per_layer(sstate.backward)
      total = float(sum(layer.size for layer in self.layers))
      out['sparsity/backward_density'] = sum(_count(b) for b in back) / total
    return out


@RULES.register('gse')
class GSE(Rule):
  """Guided stochastic exploration: grow by gradients at sampled inactive positions only.

  Per layer: sample gamma * |active| inactive candidates uniformly, compute the gradient there
  from the layer's inputs and output gradients (`aux`, see `capture`; dense layers and
  convolutions, gse.py), grow the top alpha_t * |active| by |gradient|, then prune back to the
  target count by |w| among the previously active weights, so a weight just grown is never
  pruned. A balanced layer (Dense kernels, any block shape) does the same per output
  block-column with blocks: gamma K inactive blocks sampled per column, their gradients
  x[:, block rows]^T @ dy[:, block columns] only, the top alpha_t K grown by summed |gradient|.
  """

  needs_aux = True
  keeps_balance = True

  def __init__(
    self,
    params_shapes: Any,
    layers: list[Layer],
    *,
    gse_gamma: float = 1.0,
    gse_alpha: float = 0.2,
    **options: Any,
  ) -> None:
    super().__init__(params_shapes, layers, **options)
    self.gamma = float(gse_gamma)
    if self.gamma <= 0:
      raise ValueError(f'sparsity.gse_gamma={self.gamma} must be > 0')
    self.grow = DropSchedule(self.drop.kind, float(gse_alpha), self.schedule.end, self.drop.decay)
    for layer in layers:
      if layer.balanced and len(layer.shape) != 2:
        raise ValueError(
          f'gse with balanced masks runs Dense (2-D) kernels only; {layer.name} has shape '
          f'{layer.shape}: use sparsity.balanced=False'
        )
      if not layer.balanced and layer.block != (1, 1):
        raise ValueError(f'gse supports block_shape (1, 1) only, got {layer.block}')
    # Balanced: sampled blocks per block-column; else sampled weights per layer.
    self.samples = [
      min(
        round(self.gamma * layer.active_blocks / layer.columns),
        layer.blocks // layer.columns - layer.active_blocks // layer.columns,
      )
      if layer.balanced
      else min(int(round(self.gamma * layer.active)), layer.size - layer.active)
      for layer in layers
    ]
    self.convs: dict[tuple[str, ...], gse.ConvGeometry] = {}  # filled while capture() traces

  def capture(self) -> contextlib.AbstractContextManager:
    """Captures inputs and output gradients, and records each sparse conv's geometry."""
    return gse.capture([self.paths[layer.index] for layer in self.layers], self.convs)

  def new_masks(self, sstate, params, g_fwd, step, key, aux):
    del g_fwd
    if aux is None:
      raise ValueError('gse needs aux (layer inputs and output gradients); see GSE.capture')
    frac = self.grow(step)
    out = []
    for layer, c, m, p in zip(
      self.layers,
      self.samples,
      self.per_layer(sstate.masks),
      self.per_layer(params),
      strict=True,
    ):
      if layer.balanced:
        out.append(self._balanced_masks(layer, c, m, p, aux, frac, key))
        continue
      cand = select.random_mask(jax.random.fold_in(key, layer.index), layer.shape, c, ~m)
      idx = jnp.nonzero(cand.reshape(-1), size=c, fill_value=0)[0]  # (C,)
      path = self.paths[layer.index]
      g = gse.sampled_layer_grads(aux, path, layer.shape, idx, self.convs)  # (C,)
      k = jnp.minimum(jnp.round(frac * layer.active).astype(jnp.int32), c)
      top = select.topk_mask(jnp.abs(g), k)  # (C,)
      grown = jnp.zeros(layer.size, bool).at[idx].max(top).reshape(layer.shape)
      keep = _topk(p, layer.active - _count(grown), layer, valid=m)
      out.append(keep | grown)
    return {'masks': self.as_tree(out)}

  def _balanced_masks(self, layer, samples, m, p, aux, frac, key):
    """Per block-column: `samples` inactive blocks drawn uniformly, the top round(frac K) of
    them by the summed |gradient| of the block grown, the top K minus that of the active blocks
    by |w| kept (K blocks per column). Only the sampled blocks' gradients are computed."""
    per_col = layer.active_blocks // layer.columns
    active = select.to_blocks(m, layer.block, 'any')  # (R, C)
    key = jax.random.fold_in(key, layer.index)
    cand = select.balanced_random_mask(key, active.shape, samples, ~active)  # (R, C)
    rows = jnp.argsort(~cand, axis=0, stable=True)[:samples].T.astype(jnp.int32)  # (C, S)
    x, gy = gse.dense_io(aux, self.paths[layer.index], layer.shape)
    g = gse.sampled_block_grads(x, gy, layer.block, rows)  # (C, S, bi, bo)
    n = jnp.minimum(jnp.round(frac * per_col).astype(jnp.int32), samples)
    top = select.balanced_topk_mask(jnp.abs(g).sum(axis=(2, 3)).T, n)  # (S, C)
    cols = jax.lax.broadcasted_iota(jnp.int32, rows.shape, 0)  # (C, S)
    grown = jnp.zeros(active.shape, bool).at[rows, cols].max(top.T)  # (R, C)
    keep = _topk(p, (per_col - n) * layer.columns, layer, valid=m)
    return keep | select.from_blocks(grown, layer.block)


@RULES.register('gmp')
class GMP(Rule):
  """Gradual magnitude pruning (Zhu & Gupta): dense start, cubic schedule to each layer's target.

  Update k of n keeps the top-|w| active weights down to row k of `counts` (see
  `schedules.cubic_counts`): integers fixed at build time, the last row the plan's exact count.
  A window without any update step cannot prune at all and is an error at build time.
  """

  def __init__(self, params_shapes: Any, layers: list[Layer], **options: Any) -> None:
    super().__init__(params_shapes, layers, **options)
    sch = self.schedule
    if layers and not sch.steps():
      raise ValueError(
        f'sparsity.rule=gmp never prunes: {self.window()} are none, so the run would end dense. '
        'Lower sparsity.update_every_steps or sparsity.start_step, or raise '
        'sparsity.end_fraction or total_steps.'
      )
    self.counts = (
      cubic_counts(
        sch,
        [layer.sparsity for layer in layers],
        [layer.blocks for layer in layers],
        [layer.active_blocks for layer in layers],
      )
      if layers
      else np.zeros((1, 0), np.int32)
    )  # (updates + 1, L)

  def initial_masks(self, params, key):
    return {'masks': self.as_tree([jnp.ones(layer.shape, bool) for layer in self.layers])}

  def target_active_blocks(self, step: jax.Array) -> list[jax.Array]:
    """Each layer's active block count once the updates up to `step` (inclusive) have run."""
    sch = self.schedule
    done = jnp.clip((jnp.asarray(step) - sch.start) // sch.every, 0, len(self.counts) - 1)
    done = jnp.where(jnp.asarray(step) >= sch.end, len(self.counts) - 1, done)
    row = jnp.asarray(self.counts)[done]  # (..., L)
    return [row[..., j] for j in range(len(self.layers))]

  def new_masks(self, sstate, params, g_fwd, step, key, aux):
    masks = [
      _topk(p, k, layer, valid=m)
      for layer, k, m, p in zip(
        self.layers,
        self.target_active_blocks(step),
        self.per_layer(sstate.masks),
        self.per_layer(params),
        strict=True,
      )
    ]
    return {'masks': self.as_tree(masks)}
