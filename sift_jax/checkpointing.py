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

A bad checkpoint is reported and moved to `workdir/checkpoints_corrupt/<step>` (never deleted),
and the previous one is restored. All processes agree on the verdict before anyone moves on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

MANIFEST = 'sha256.json'
# Files orbax (re)writes after its post-finalization hook, so they cannot be sealed.
_UNSEALED = (MANIFEST, '_CHECKPOINT_METADATA', 'commit_success.txt')
_TMP_SUFFIX = '.orbax-checkpoint-tmp'


class Checkpointer:
  """The one checkpoint wrapper of the trainer."""

  def __init__(self, workdir: str, keep: int):
    if keep < 1:
      raise ValueError(f'checkpoint.keep={keep} must be >= 1')
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self._pending: int | None = None
    self._set_aside_incomplete()
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_pending),
      ),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Starts a collective asynchronous save (every process calls it with the same step)."""
    self._manager.wait_until_finished()  # one save in flight: the seal knows its step
    self._pending = step
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
    """Restores the newest good checkpoint into `abstract_state`'s shapes and shardings.

    Returns (state, step), or None when there is no checkpoint. A checkpoint that fails its
    checksums or cannot be read is reported, moved to checkpoints_corrupt/ and skipped for the
    one before it. Raises if checkpoints exist but none is good, so a run never silently
    starts over on top of them.
    """
    failures = []
    for step in reversed(self.steps()):
      problem = _agreed(self._verify(step) if jax.process_index() == 0 else '')
      restored = None
      if not problem:
        try:
          restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
          )['state']
        except Exception as e:  # orbax raises many types for unreadable files
          problem = f'{type(e).__name__}: {e}'.splitlines()[0]
        problem = _agreed(problem)
      if not problem:
        _check_shapes(abstract_state, restored, step)
        self._manager.reload()  # forget the steps moved aside
        return restored, step
      failures.append(f'step {step}: {problem}')
      moved = self._set_aside(step, 'checkpoints_corrupt')
      logging.error(
        'checkpoint %s/%d is bad (%s); moved it to %s and trying the previous one',
        self.directory,
        step,
        problem,
        moved,
      )
    if failures:
      raise RuntimeError(
        f'no readable checkpoint in {self.directory} (bad ones were moved to '
        f'{os.path.join(self.workdir, "checkpoints_corrupt")}); tried: ' + '; '.join(failures)
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
    """Moves saves interrupted by a kill out of the way (orbax would trip over them)."""
    if jax.process_index() == 0:
      for folder in sorted(glob.glob(os.path.join(self.directory, f'*{_TMP_SUFFIX}*'))):
        moved = _move_aside(folder, os.path.join(self.workdir, 'checkpoints_incomplete'))
        logging.error('found an interrupted save %s; moved it to %s', folder, moved)
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


def _check_shapes(expected: Any, restored: Any, step: int) -> None:
  want = jax.tree.map(lambda x: (x.shape, x.dtype), expected)
  got = jax.tree.map(lambda x: (x.shape, x.dtype), restored)
  if want != got:
    raise ValueError(f'checkpoint at step {step} does not match the model of this config')
