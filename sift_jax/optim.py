"""Optimizers and learning-rate schedules from the `optim` config group."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import optax

from sift_jax.registry import OPTIMIZERS

SCHEDULES = ('constant', 'multistep', 'cosine')


def warmup_steps(c: ml_collections.ConfigDict, total_steps: int) -> int:
  """optim.warmup_steps when set (> 0), else round(optim.warmup_fraction * total_steps).

  A fraction of the run is how the papers state warmup (GPT-3 Small: 2151 of 21511 steps), and
  it keeps holding when a run is shortened with --config.total_steps alone.
  """
  fraction = c.get('warmup_fraction', 0.0)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'optim.warmup_fraction={fraction} must be in [0, 1]')
  if c.warmup_steps < 0 or c.warmup_steps > total_steps:
    raise ValueError(
      f'optim.warmup_steps={c.warmup_steps} must be in [0, total_steps={total_steps}]: lower it '
      'too, or set it to 0 and give optim.warmup_fraction (warmup as a fraction of the run)'
    )
  return int(c.warmup_steps) if c.warmup_steps else round(fraction * total_steps)


def make_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `c.lr`, then constant, step decay or cosine decay to `c.end_lr`."""
  if c.schedule not in SCHEDULES:
    raise ValueError(f'unknown optim.schedule {c.schedule!r}; known: {", ".join(SCHEDULES)}')
  warmup = warmup_steps(c, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if c.schedule == 'constant':
    main = optax.constant_schedule(c.lr)
  elif c.schedule == 'multistep':
    for f in c.decay_fractions:
      if not 0 < f < 1:
        raise ValueError(f'optim.decay_fractions={tuple(c.decay_fractions)} must lie in (0, 1)')
    # Boundaries are fractions of the whole run (epochs 60/120/160 of 200 = 0.3/0.6/0.8).
    boundaries = {int(f * total_steps) - warmup: c.decay_factor for f in c.decay_fractions}
    main = optax.piecewise_constant_schedule(c.lr, boundaries)
  else:
    main = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.end_lr / c.lr if c.lr else 0.0)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), main], [warmup])


def decay_mask(params):
  """True for the leaves weight decay applies to: kernels and embeddings, not norms or biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


@OPTIMIZERS.register('sgd')
def _sgd(c: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  # Coupled decay (added to the gradient before momentum), as torch.optim.SGD does in the papers.
  decay = optax.add_decayed_weights(c.weight_decay, None if c.decay_norm_and_bias else decay_mask)
  return optax.chain(decay, optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov))


@OPTIMIZERS.register('adamw')
def _adamw(c: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(
    lr,
    b1=c.b1,
    b2=c.b2,
    eps=c.eps,
    weight_decay=c.weight_decay,
    mask=None if c.decay_norm_and_bias else decay_mask,
  )


def make_optimizer(
  c: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """Returns the optimizer (with clipping in front) and its learning-rate schedule."""
  if c.lr <= 0:
    raise ValueError(f'optim.lr={c.lr} must be positive')
  if c.clip_norm < 0:
    raise ValueError(f'optim.clip_norm={c.clip_norm} must be >= 0 (0 = no clipping)')
  schedule = make_schedule(c, total_steps)
  tx = OPTIMIZERS.get(c.name)(c, schedule)
  if c.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)
  return tx, schedule
