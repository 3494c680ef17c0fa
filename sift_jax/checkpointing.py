"""orbax-checkpoint under workdir/checkpoints/<step>/: atomic saves, keep-last-K, resume.

orbax writes each checkpoint into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoints intact. A checkpoint that
is there but unreadable (truncated or corrupted files) is reported and skipped for
the one before it; it is never deleted.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """The one checkpoint wrapper of the trainer."""

  def __init__(self, workdir: str, keep: int):
    if keep < 1:
      raise ValueError(f'checkpoint.keep={keep} must be >= 1')
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint into `abstract_state`'s shapes and shardings.

    Returns (state, step), or None when there is no checkpoint. Raises if checkpoints
    exist but none can be read, so a run never silently starts over on top of them.
    """
    steps = self.steps()
    failures = []
    for step in reversed(steps):
      try:
        restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
      except Exception as e:  # orbax raises many types for unreadable files
        failures.append(f'step {step}: {type(e).__name__}: {e}'.splitlines()[0])
        logging.error(
          'checkpoint %s/%d is unreadable, trying the previous one: %s',
          self.directory,
          step,
          failures[-1],
        )
        continue
      _check_shapes(abstract_state, restored['state'], step)
      return restored['state'], step
    if failures:
      raise RuntimeError(
        f'no readable checkpoint in {self.directory}; tried: ' + '; '.join(failures)
      )
    return None

  def close(self) -> None:
    self._manager.close()


def _check_shapes(expected: Any, restored: Any, step: int) -> None:
  want = jax.tree.map(lambda x: (x.shape, x.dtype), expected)
  got = jax.tree.map(lambda x: (x.shape, x.dtype), restored)
  if want != got:
    raise ValueError(f'checkpoint at step {step} does not match the model of this config')
