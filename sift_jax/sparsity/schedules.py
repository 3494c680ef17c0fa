"""Schedules, kept separate: when to update, what fraction to swap, target sparsity over time.

All are jnp functions of the (traced) step so they run inside the compiled train step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DROP_SCHEDULES = ('constant', 'cosine', 'exponential')
TARGET_SCHEDULES = ('constant', 'cubic')


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
  """Updates at steps start + dT, start + 2 dT, ... while step < end_step."""

  every: int
  start: int
  end: int

  def __post_init__(self):
    if self.every < 1:
      raise ValueError(f'sparsity.update_every_steps={self.every} must be >= 1')

  def is_update(self, step: jax.Array) -> jax.Array:
    since = step - self.start
    return (since > 0) & (since % self.every == 0) & (step < self.end)


def end_step(total_steps: int, end_fraction: float) -> int:
  if not 0.0 <= end_fraction <= 1.0:
    raise ValueError(f'sparsity.end_fraction={end_fraction} is outside [0, 1]')
  return int(round(end_fraction * total_steps))


@dataclasses.dataclass(frozen=True)
class DropSchedule:
  """f_t: constant f0; cosine f0 (1 + cos(pi t / T_end)) / 2; exponential f0 * r ** (t / T_end)."""

  kind: str
  f0: float
  end: int
  decay: float = 0.1  # exponential: the fraction left at T_end

  def __post_init__(self):
    if self.kind not in DROP_SCHEDULES:
      raise ValueError(f'sparsity.drop_schedule={self.kind!r}; allowed: {DROP_SCHEDULES}')
    if not 0.0 <= self.f0 <= 1.0:
      raise ValueError(f'sparsity.drop_fraction={self.f0} is outside [0, 1]')

  def __call__(self, step: jax.Array) -> jax.Array:
    t = jnp.clip(step / max(self.end, 1), 0.0, 1.0)
    if self.kind == 'cosine':
      return self.f0 * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    if self.kind == 'exponential':
      return self.f0 * jnp.power(self.decay, t)
    return jnp.full((), self.f0, jnp.float32)


@dataclasses.dataclass(frozen=True)
class TargetSchedule:
  """Fraction of each layer's final sparsity reached at step t.

  constant: 1 throughout. cubic (Zhu & Gupta): 1 - (1 - (t - start) / (end - start)) ** 3,
  from 0 at `start` to 1 at `end`, with s_t = s_i + (s_f - s_i) * fraction.
  """

  kind: str
  start: int
  end: int

  def __post_init__(self):
    if self.kind not in TARGET_SCHEDULES:
      raise ValueError(f'target sparsity schedule {self.kind!r}; allowed: {TARGET_SCHEDULES}')

  def __call__(self, step: jax.Array) -> jax.Array:
    if self.kind == 'constant':
      return jnp.ones((), jnp.float32)
    progress = jnp.clip((step - self.start) / max(self.end - self.start, 1), 0.0, 1.0)
    return 1.0 - (1.0 - progress) ** 3
