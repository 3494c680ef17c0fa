"""Schedules, kept separate: when to update, what fraction to swap, target sparsity over time.

The drop fractions are optax schedules (jnp functions of the traced step, so they run inside the
compiled train step). The update steps themselves are static, known on the host at build time:
a schedule that never updates is caught before training, and gradual pruning's counts are
integers computed once in float64, ending exactly at the plan's counts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

DROP_SCHEDULES = ('constant', 'cosine', 'exponential')


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
  """Updates at steps start + dT, start + 2 dT, ... while step < end."""

  every: int
  start: int
  end: int

  def __post_init__(self):
    if self.every < 1:
      raise ValueError(f'sparsity.update_every_steps={self.every} must be >= 1')
    if self.start < 0:
      raise ValueError(f'sparsity.start_step={self.start} must be >= 0')

  def is_update(self, step: jax.Array) -> jax.Array:
    since = step - self.start
    return (since > 0) & (since % self.every == 0) & (step < self.end)

  def steps(self) -> range:
    """Every update step, in order (empty when no update falls inside the window)."""
    return range(self.start + self.every, self.end, self.every)

  def window(
    self,
    every_key: str = 'sparsity.update_every_steps',
    end_key: str = 'sparsity.end_fraction * total_steps',
  ) -> str:
    """The window in words, naming the config keys that set it (for errors and warnings)."""
    return (
      f'the update steps sparsity.start_step + k * {every_key} (k >= 1) = '
      f'{self.start} + k * {self.every} before step {self.end} ({end_key})'
    )


def end_step(total_steps: int, end_fraction: float) -> int:
  if not 0.0 <= end_fraction <= 1.0:
    raise ValueError(f'sparsity.end_fraction={end_fraction} is outside [0, 1]')
  return int(round(end_fraction * total_steps))


@dataclasses.dataclass(frozen=True)
class DropSchedule:
  """f_t: constant f0; cosine f0 (1 + cos(pi t / T_end)) / 2; exponential f0 * r ** (t / T_end),
  each held at its T_end value afterwards."""

  kind: str
  f0: float
  end: int
  decay: float = 0.1  # exponential: the fraction left at T_end

  def __post_init__(self):
    if self.kind not in DROP_SCHEDULES:
      raise ValueError(f'sparsity.drop_schedule={self.kind!r}; allowed: {DROP_SCHEDULES}')
    if not 0.0 <= self.f0 <= 1.0:
      raise ValueError(f'sparsity.drop_fraction={self.f0} is outside [0, 1]')
    if self.kind == 'exponential' and not 0.0 < self.decay <= 1.0:
      raise ValueError(f'sparsity.drop_decay={self.decay} is outside (0, 1]')

  def schedule(self) -> optax.Schedule:
    steps = max(self.end, 1)
    if self.kind == 'cosine':
      return optax.cosine_decay_schedule(self.f0, steps)
    if self.kind == 'exponential':
      return optax.exponential_decay(self.f0, steps, self.decay, end_value=self.f0 * self.decay)
    return optax.constant_schedule(self.f0)

  def __call__(self, step: jax.Array) -> jax.Array:
    value = jnp.asarray(self.schedule()(step), jnp.float32)
    return jnp.broadcast_to(value, jnp.shape(step))  # optax's constant ignores the step


def cubic_counts(
  schedule: UpdateSchedule, sparsities: list[float], blocks: list[int], final: list[int]
) -> np.ndarray:
  """Gradual pruning's active counts (Zhu & Gupta): row k holds each layer's count after update k.

  Row 0 is the dense start; the fraction of the final sparsity reached at update k of n is
  1 - (1 - k / n)^3 (what optax.polynomial_schedule(0, 1, power=3) gives, here in float64 numpy
  on the host: optax would compile a jnp program per shape at every rule build and round in
  float32). Counts are rounded in float64, never below the plan's exact final count `final`,
  and the last row equals it.
  """
  n = len(schedule.steps())
  frac = 1.0 - (1.0 - np.arange(1, n + 1, dtype=np.float64) / n) ** 3  # (n,)
  s = np.asarray(sparsities, np.float64)[None, :]  # (1, L)
  size = np.asarray(blocks, np.int64)[None, :]  # (1, L)
  counts = np.maximum(np.round((1.0 - s * frac[:, None]) * size), np.asarray(final)[None, :])
  counts[-1] = final  # (n, L)
  return np.concatenate([size, counts]).astype(np.int32)  # (n + 1, L)
