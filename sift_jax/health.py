"""Divergence checks: a NaN/Inf or exploding loss, or NaN/Inf weights, stops a run before it
logs or saves the bad step, keeping the last good checkpoint."""

from __future__ import annotations

import math
import statistics
from typing import Any

from sift_jax import errors

# A loss above DIVERGENCE_FACTOR x max(loss of a uniform guess, median of the last
# DIVERGENCE_WINDOW checked losses) counts as divergence: no healthy run jumps that far.
DIVERGENCE_FACTOR = 10.0
DIVERGENCE_WINDOW = 10


class NonFiniteLossError(errors.UserError):
  """Training (or eval) produced a NaN/Inf or an exploding loss, or NaN/Inf weights.

  Nothing after the last good checkpoint is kept: unconfirmed checkpoints are moved to
  checkpoints_diverged/.
  """


def uniform_loss(meta: dict[str, Any]) -> float:
  """Cross-entropy of a uniform guess over the outputs: the scale of an untrained model's loss."""
  return math.log(meta.get('vocab_size') or meta['num_classes'])


class Health:
  """Checks each logged or saved step before it is written; confirms healthy checkpoints."""

  def __init__(self, uniform: float, ckpt):
    self.uniform = uniform
    self.ckpt = ckpt
    self.recent: list[float] = []

  def limit(self) -> float:
    typical = statistics.median(self.recent) if self.recent else 0.0
    return DIVERGENCE_FACTOR * max(self.uniform, typical)

  def check(self, row: dict[str, Any], step: int, params_finite: bool) -> None:
    """Raises NonFiniteLossError on NaN/Inf loss, gradient or weights, or an exploding loss.

    train/loss at `step` is the loss of the state of step - 1 (and eval/loss that of `step`),
    so a passing check confirms the checkpoints up to there.
    """
    loss, grad_norm = float(row['train/loss']), float(row['train/grad_norm'])
    eval_loss = float(row.get('eval/loss', 0.0))
    limit = self.limit()
    problem = ''
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      problem = f'train/loss={loss}, train/grad_norm={grad_norm}'
    elif not params_finite:
      problem = 'the weights hold NaN/Inf'
    elif loss > limit or not eval_loss <= limit:
      losses = {k: row[k] for k in ('train/loss', 'eval/loss') if k in row}
      problem = (
        ', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())
        + f' above the divergence limit {limit:.4g} ({DIVERGENCE_FACTOR:g} x max(uniform-guess '
        f'loss {self.uniform:.4g}, median of the last {DIVERGENCE_WINDOW} checked losses))'
      )
    if not problem:
      self.recent = [*self.recent, loss][-DIVERGENCE_WINDOW:]
      self.ckpt.confirm(step if 'eval/loss' in row else step - 1)
      return
    moved = self.ckpt.set_aside_unconfirmed()
    kept = self.ckpt.steps()
    raise NonFiniteLossError(
      f'step {step}: {problem}; lower optim.lr or set optim.clip_norm. '
      f'Checkpoints kept: {kept or "none"}'
      + (f'; unconfirmed ones moved to {", ".join(moved)}' if moved else '')
      + '.'
    )
