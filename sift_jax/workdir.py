"""The workdir policy: which config changes a resume accepts, when a run may (re)start, the saved
config, and the locks that keep two processes off one run.

One source for the trainer, the sweep (sift_jax/sweep.py) and the study report
(analysis/report.py): the keys a resume may change, `config_diff`, and the flock() helpers. No
jax here: the sweep and the report import this module without loading the trainer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from sift_jax import errors
from sift_jax.config_lib import SAVED_CONFIG, flatten

SUMMARY = 'summary.json'
# Folders checkpointing.py moves bad checkpoints into: a run's evidence, never deleted.
CORRUPT, DIVERGED = 'checkpoints_corrupt', 'checkpoints_diverged'
SET_ASIDE = (CORRUPT, DIVERGED)
# flock()ed by the trainer for its whole life; a sweep's own lock is another file (sweep.LOCK).
TRAINER_LOCK = 'trainer.lock'

# Keys that say how a run is bookkept or where its processes meet, not what it trains: a resume
# may change them, and runs that differ only in them are one setting of a study (the report).
# data.workers: who builds the batches, not which: they are the same for every count.
BOOKKEEPING_KEYS = (
  'log_every_steps',
  'checkpoint_every_steps',
  'checkpoint.keep',
  'progress',
  'data.workers',
  'distributed.initialize',
  'distributed.coordinator_address',
  'distributed.num_processes',
  'distributed.process_id',
)
# How long a run is and what it measures on the way (not what it trains): a resume may change them.
RUN_LENGTH_KEYS = ('total_steps', 'eval_every_steps', 'eval.max_examples', 'analysis.spectral')
# Keys a resume may change because the restored state is converted to them.
CONVERTED_KEYS = ('sparsity.execution',)
# Every key a resume may change; any other difference is another run.
RESUMABLE = BOOKKEEPING_KEYS + RUN_LENGTH_KEYS + CONVERTED_KEYS


class RunStateError(errors.UserError):
  """The workdir's checkpoints do not allow this run: past its end, or lost."""


class WorkdirBusyError(errors.UserError):
  """Another process holds the workdir's lock."""


def plain_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """A config as the JSON its config.json holds (tuples as lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json())
  return json.loads(json.dumps(config))


def config_diff(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, wanted value)} for every key whose value differs, sorted; either
  config nested JSON or a ConfigDict (a key only one of them has differs from None)."""
  old, new = flatten(plain_json(saved)), flatten(plain_json(wanted))
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return {k: (old.get(k), new.get(k)) for k in keys}


def resume_conflicts(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
  """config_diff without the keys a resume may change: non-empty means another run."""
  return {k: v for k, v in config_diff(saved, wanted).items() if k not in RESUMABLE}


def describe(diff: Mapping[str, tuple[Any, Any]], limit: int = 10) -> str:
  """'optim.lr: 0.1 -> 0.2, ...' of a config_diff, its first `limit` keys."""
  return ', '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in list(diff.items())[:limit])


def read_saved_config(workdir: str) -> dict[str, Any] | None:
  """The workdir's config.json, None if it has none."""
  path = os.path.join(workdir, SAVED_CONFIG)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """Refuses to resume a workdir whose saved config differs in more than the RESUMABLE keys.

  Returns the saved run's total_steps when this config changes it (None otherwise): the
  learning-rate and mask-update schedules are functions of it, so the resume line says so.
  """
  saved = read_saved_config(workdir)
  if saved is None:
    return None
  conflicts = resume_conflicts(saved, config)
  if conflicts:
    raise ValueError(
      f'workdir {workdir} holds a run with a different config ({describe(conflicts)}); only '
      f'{", ".join(RESUMABLE)} may change on resume. Use a new --workdir.'
    )
  old_total = saved.get('total_steps')
  return old_total if old_total != config.total_steps else None


def check_fresh_start(workdir: str) -> None:
  """Refuses to start at step 0 in a workdir whose checkpoints were all set aside."""
  held = [
    os.path.join(workdir, d)
    for d in SET_ASIDE
    if os.path.isdir(os.path.join(workdir, d)) and os.listdir(os.path.join(workdir, d))
  ]
  if held or os.path.exists(os.path.join(workdir, SUMMARY)):
    evidence = ', '.join(held) or os.path.join(workdir, SUMMARY)
    raise RunStateError(
      f'{workdir} has no checkpoint left but held a run ({evidence}); refusing to start over '
      f'from step 0 on top of it. To start over, move {workdir} away or pass a new --workdir.'
    )


# --------------------------------------------------------------------------- locks


def try_lock(fd: int) -> bool:
  """An exclusive flock() on `fd` if no other open file holds one; never blocks."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  return True


def take_lock(path: str) -> int | None:
  """An open file descriptor holding an exclusive flock() on the lock file `path` (which then
  names this host and pid), or None if another process holds it. The kernel drops the lock when
  the last process holding the descriptor exits, so a killed process leaves no stale lock. The
  file is never deleted: unlinking it would let a waiter lock the old file while a newcomer
  locks a new one."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  if not try_lock(fd):
    os.close(fd)
    return None
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}).encode())
  return fd


def lock_owner(path: str) -> str | None:
  """Who holds the lock file `path` ('host pid N'), or None if no process does."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    if try_lock(fd):
      return None
  finally:
    os.close(fd)
  try:
    with open(path) as f:
      owner = json.load(f)
  except (OSError, ValueError):  # the holder is between truncating and writing its name
    owner = {}
  return f'{owner.get("host", "?")} pid {owner.get("pid", "?")}'


@contextlib.contextmanager
def trainer_lock(workdir: str) -> Iterator[None]:
  """Holds the workdir for a trainer's life; raises WorkdirBusyError naming the holder when
  another trainer has it. A sweep's lock on the same run is another file (sweep.LOCK)."""
  path = os.path.join(workdir, TRAINER_LOCK)
  fd = take_lock(path)
  if fd is None:
    raise WorkdirBusyError(
      f'--workdir={workdir} is in use by another trainer ({lock_owner(path) or "just exited"}); '
      'wait for it to finish or stop it, or pass another --workdir'
    )
  try:
    yield
  finally:
    os.close(fd)
