"""Stopping cleanly on SIGTERM / SIGINT: save at the next step boundary, then exit 0.

Cluster schedulers send SIGTERM before they reclaim a host. On one process the handler only
sets a flag; the train loop polls it once per step, so the checkpoint is written from a
consistent state. With several processes every host must stop at the same step, so there the
signal is left to JAX's preemption service (on by default after jax.distributed.initialize),
which orbax's `CheckpointManager.reached_preemption` polls (`Checkpointer.reached_preemption`).

The guard covers the whole run, not just the step loop: a signal that arrives after the last
step (while the final checkpoint is written, or the summary) lets the run finish and exit 0
instead of killing it half-way.
"""

from __future__ import annotations

import os
import signal
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
  """Context manager: while active, SIGTERM/SIGINT request a stop instead of killing the run."""

  def __init__(self):
    self._requested = threading.Event()
    self._previous = {}
    self.signal_name = ''

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is not threading.main_thread():
      return self
    if jax.process_count() == 1:
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    else:  # JAX's preemption service only listens for SIGTERM
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, _as_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    self._requested.set()

  @property
  def requested(self) -> bool:
    """True once this process got SIGTERM/SIGINT (single-process runs only)."""
    return self._requested.is_set()


def _as_sigterm(signum, frame) -> None:
  del signum, frame
  os.kill(os.getpid(), signal.SIGTERM)
