"""orbax-checkpoint under workdir/checkpoints/<step>/: atomic collective saves, checksums, resume.

Every process writes its own shards (orbax's collective save); process 0 commits. Three ways a
checkpoint can go bad, and what happens to each:

- Killed mid-save (SIGKILL, power loss): orbax writes into `<step>.orbax-checkpoint-tmp*` and
  renames only when complete, so the previous checkpoints are intact. The next run moves the
  incomplete folder to `workdir/checkpoints_incomplete/` and logs it.
- Truncated or garbled files: orbax reads some damage back without an error (a flipped byte
  in an array chunk restores as a wrong number), so each checkpoint carries `sha256.json`, the
  checksums of its files, written inside the temporary folder before orbax's rename: a
  checkpoint is never visible without them. Restoring verifies them first.
- Unreadable for any other reason (orbax raises).

A save that fails (a full disk, say) stops the run at the next step boundary (`check_save`),
not at the next save, so no steps are trained that no checkpoint can hold; the previous
checkpoint stays the last, and the failed save's temporary folder is moved aside on rerun.

A bad checkpoint is reported and moved to `workdir/checkpoints_corrupt/<step>` (never deleted)
once an older one restores; when none restores, nothing is moved and the run stops with an
error. All processes agree on the verdict before anyone moves on. A checkpoint whose shapes do
not fit the model is not damage but a config change: it is reported with the parameter and the
two shapes, and nothing is moved.

Keep-last-N never deletes the newest *confirmed* checkpoint: one whose state later produced a
healthy loss (the trainer calls `confirm`). A run stopped for divergence moves the unconfirmed
ones to `workdir/checkpoints_diverged/`, so the latest checkpoint is the last good state.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging as std_logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from sift_jax import errors
from sift_jax.workdir import CORRUPT, DIVERGED

MANIFEST = 'sha256.json'
# Files orbax (re)writes after its post-finalization hook, so they cannot be sealed.
_UNSEALED = (MANIFEST, '_CHECKPOINT_METADATA', 'commit_success.txt')
_TMP_SUFFIX = '.orbax-checkpoint-tmp'


class CheckpointMismatchError(errors.UserError):
  """A checkpoint's arrays do not fit the model this config builds."""


class NoReadableCheckpointError(errors.UserError):
  """Checkpoints exist but none can be restored."""


class SaveFailedError(errors.UserError):
  """An asynchronous save failed for a reason other than an unwritable workdir."""


class _DropWriteErrorTracebacks(std_logging.Filter):
  """Drops orbax's logged tracebacks of a failed write (disk full, read-only): the error is
  re-raised in the main thread, where the trainer reports it in one line."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.exc_info and errors.workdir_error(record.exc_info[1], None))


_QUIET = _DropWriteErrorTracebacks()


class Checkpointer:
  """The one checkpoint wrapper of the trainer."""

  def __init__(self, workdir: str, keep: int):
    if keep < 1:
      raise ValueError(f'checkpoint.keep={keep} must be >= 1')
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.keep = keep
    std_logging.getLogger('absl').addFilter(_QUIET)  # adding it again is a no-op
    self._pending: int | None = None  # the step of the latest save
    self._in_flight = False  # whether that save may still be running (or failed unseen)
    self._confirmed: int | None = None  # the newest step known to hold a healthy state
    self._set_aside_incomplete()
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=None,  # pruned by `_prune`, which spares the newest confirmed step
        create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_pending),
      ),
      item_handlers={'state': ocp.StandardCheckpointHandler()},  # for item_metadata
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Starts a collective asynchronous save (every process calls it with the same step)."""
    self.wait()  # one save in flight: the seal knows its step
    self._pending = step
    self._in_flight = True
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

  def wait(self) -> None:
    """Waits for the save in flight, then applies keep-last-N."""
    self._finish()
    self._prune()

  def check_save(self) -> None:
    """Raises the error of a save that has failed; never blocks. Called at every step boundary,
    so a failed save stops the run one step after it failed."""
    if self._in_flight and not self._manager.is_saving_in_progress():
      self._finish()

  def _finish(self) -> None:
    """Waits for the save in flight; raises its error, as one line for a user to act on."""
    self._in_flight = False
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      if errors.workdir_error(e, self.workdir):  # the trainer names the path and the remedy
        raise
      last = [s for s in self.steps() if s != self._pending]
      raise SaveFailedError(
        f'saving checkpoint {self._pending} in {self.directory} failed ({_one_line(e)}); '
        f'the last good checkpoint is {last[-1] if last else "none"}: rerun to resume from it'
      ) from e

  def confirm(self, step: int) -> None:
    """Marks the state of `step` healthy: the newest checkpoint at or before it is kept."""
    self._confirmed = max([s for s in self.steps() if s <= step], default=self._confirmed)

  def set_aside_unconfirmed(self) -> list[str]:
    """Moves the checkpoints newer than the newest confirmed one to checkpoints_diverged/."""
    self._manager.wait_until_finished()
    moved = [
      self._set_aside(s, DIVERGED)
      for s in self.steps()
      if self._confirmed is None or s > self._confirmed
    ]
    self._manager.reload()
    return moved

  def reached_preemption(self, step: int) -> bool:
    """With several processes: JAX's preemption service (via orbax) agrees on the step."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def _prune(self) -> None:
    steps = self.steps()
    keep = set(steps[-self.keep :]) | {self._confirmed}
    for s in steps:
      if s not in keep:
        self._manager.delete(s)

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
    """Restores the newest good checkpoint into `abstract_state`'s shapes and shardings.

    Returns (state, step), or None when there is no checkpoint. Checkpoints that fail their
    checksums or cannot be read are skipped for older ones and, once one restores, moved to
    checkpoints_corrupt/. Raises NoReadableCheckpointError (moving nothing) if none restores,
    and CheckpointMismatchError if the newest intact one does not fit the model.
    """
    failures = []
    for step in reversed(self.steps()):
      problem = _agreed(self._verify(step) if jax.process_index() == 0 else '')
      restored = None
      if not problem:
        try:
          saved = self._manager.item_metadata(step)['state']
        except Exception as e:  # orbax raises many types for unreadable files
          problem = _one_line(e)
        if not problem:
          check_fits(abstract_state, saved, os.path.join(self.directory, str(step)))
          try:
            restored = self._manager.restore(
              step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )['state']
          except Exception as e:
            problem = _one_line(e)
        problem = _agreed(problem)
      if not problem:
        for bad, why in failures:
          moved = self._set_aside(bad, CORRUPT)
          logging.error(
            'checkpoint %s/%d is bad (%s); moved it to %s', self.directory, bad, why, moved
          )
        self._manager.reload()  # forget the steps moved aside
        self._confirmed = step
        return restored, step
      failures.append((step, problem))
    if failures:
      tried = '; '.join(f'step {s}: {p}' for s, p in failures)
      raise NoReadableCheckpointError(
        f'no readable checkpoint in {self.directory} (nothing was moved; tried {tried}). '
        f'To start over from step 0, move {self.directory} away or pass a new --workdir.'
      )
    return None

  def close(self) -> None:
    self._manager.close()

  # ----- checksums
  def _seal_pending(self) -> None:
    """orbax's post-finalization hook: runs after every file is written, before the rename."""
    if jax.process_index() != 0 or self._pending is None:
      return
    folders = glob.glob(os.path.join(self.directory, f'{self._pending}{_TMP_SUFFIX}*'))
    if len(folders) != 1:
      raise RuntimeError(f'cannot find the folder of the checkpoint being saved: {folders}')
    _write_json_atomic(os.path.join(folders[0], MANIFEST), file_digests(folders[0]))

  def _verify(self, step: int) -> str:
    """'' when the checkpoint's files match their checksums, else what is wrong."""
    folder = os.path.join(self.directory, str(step))
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
      logging.warning('checkpoint %s has no %s; restoring it unverified', folder, MANIFEST)
      return ''
    try:
      with open(path) as f:
        expected = json.load(f)
    except (OSError, ValueError) as e:
      return f'unreadable {MANIFEST}: {e}'
    actual = file_digests(folder)
    bad = sorted(name for name, digest in expected.items() if actual.get(name) != digest)
    if bad:
      return f'{len(bad)} file(s) missing or changed since saved: {", ".join(bad[:5])}'
    return ''

  # ----- moving bad checkpoints aside
  def _set_aside_incomplete(self) -> None:
    """Moves saves interrupted by a kill out of the way (orbax would trip over them).

    Only the latest interrupted save is kept in checkpoints_incomplete/, for inspection: a run
    killed again and again would otherwise fill the disk with them.
    """
    if jax.process_index() == 0:
      folders = sorted(
        glob.glob(os.path.join(self.directory, f'*{_TMP_SUFFIX}*')),
        key=lambda f: int(os.path.basename(f).split('.')[0]),
      )
      into = os.path.join(self.workdir, 'checkpoints_incomplete')
      if folders:
        shutil.rmtree(into, ignore_errors=True)
        for older in folders[:-1]:
          shutil.rmtree(older)
        moved = _move_aside(folders[-1], into)
        logging.error('found an interrupted save %s; moved it to %s', folders[-1], moved)
    _barrier('sift_jax_checkpoints_tidy')

  def _set_aside(self, step: int, where: str) -> str:
    target = ''
    if jax.process_index() == 0:
      target = _move_aside(
        os.path.join(self.directory, str(step)), os.path.join(self.workdir, where)
      )
    _barrier(f'sift_jax_set_aside_{step}')
    return target


def file_digests(folder: str) -> dict[str, str]:
  """Relative path -> sha256 of every file under `folder` but orbax's top-level markers."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel in _UNSEALED:
        continue
      h = hashlib.sha256()
      with open(path, 'rb') as f:
        for chunk in iter(lambda f=f: f.read(1 << 20), b''):
          h.update(chunk)
      out[rel] = h.hexdigest()
  return out


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _move_aside(folder: str, into: str) -> str:
  """Moves `folder` into `into/`, never over an existing entry; returns the new path."""
  os.makedirs(into, exist_ok=True)
  target = os.path.join(into, os.path.basename(folder))
  if os.path.exists(target):
    target += time.strftime('.%Y%m%d-%H%M%S')
  shutil.move(folder, target)
  return target


def _agreed(problem: str) -> str:
  """The first non-empty problem over all processes ('' when every process is fine)."""
  if jax.process_count() == 1:
    return problem
  flags = multihost_utils.process_allgather(np.int32(bool(problem)))
  if not np.any(flags):
    return ''
  return problem or f'process {int(np.argmax(flags))} could not read it'


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _one_line(e: BaseException) -> str:
  return f'{type(e).__name__}: {e}'.splitlines()[0]


def shapes_by_path(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """'params/dense/kernel' -> (shape, dtype) for every array leaf of a state or its metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
    out[name] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def check_fits(expected: Any, saved: Any, folder: str) -> None:
  """Raises CheckpointMismatchError naming each array whose saved shape differs from the model's."""
  want, got = shapes_by_path(expected), shapes_by_path(saved)

  def ordered(keys):  # the parameters first: their names are the ones a user recognises
    return sorted(keys, key=lambda k: (not k.startswith('params/'), k))

  problems = [
    f'{k}: checkpoint {got[k][0]} {got[k][1]}, model {want[k][0]} {want[k][1]}'
    for k in ordered(want.keys() & got.keys())
    if want[k] != got[k]
  ]
  problems += [f'{k}: not in the checkpoint' for k in ordered(want.keys() - got.keys())]
  problems += [f'{k}: not in the model' for k in ordered(got.keys() - want.keys())]
  if problems:
    more = f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''
    raise CheckpointMismatchError(
      f'checkpoint {folder} does not fit the model of this config: '
      + '; '.join(problems[:5])
      + more
      + '. The config changed since it was saved: use the original config or a new --workdir.'
    )
