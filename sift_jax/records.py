"""Run records: what of a finished run outlives the machine it ran on.

A run folder holds checkpoints (large, and useless once the run is over) beside the three files
that say what ran and what came of it: config.json, summary.json and metrics.jsonl. A record is
those three, the metrics gzipped, in a folder committed with the study:

    experiments/<study>/runs/<sub>/<run>      the run folder (git-ignored, this machine only)
    experiments/<study>/records/<sub>/<run>   its record (committed)

The sweep writes a run's record when the run finishes (and for finished runs that have none),
and counts a run whose record matches its config as done, so a study carries on across
machines that keep no run folders. The report reads records beside run folders: a finished run
is read from its folder or, once that is gone, from its record, with the same bytes either way.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
from typing import Any

RUNS = 'runs'
RECORDS = 'records'
COPIED = ('config.json', 'summary.json')  # copied byte for byte
METRICS = 'metrics.jsonl'
COMPRESSED = METRICS + '.gz'


def _swap_component(path: str, old: str, new: str) -> str | None:
  """`path` with its last component named `old` renamed `new`; None if it has none."""
  parts = os.path.normpath(path).split(os.sep)
  for i in reversed(range(len(parts))):
    if parts[i] == old:
      parts[i] = new
      return os.sep.join(parts) or os.sep
  return None


def record_path(run_path: str) -> str | None:
  """experiments/s/runs/sub[/run] -> experiments/s/records/sub[/run]: the record (or records
  folder) of a run folder (or runs folder); None for a path with no `runs` component."""
  return _swap_component(run_path, RUNS, RECORDS)


def is_record(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, COMPRESSED))


def run_path(folder: str) -> str:
  """The run folder a record stands for (a run folder stands for itself)."""
  if is_record(folder):
    return _swap_component(folder, RECORDS, RUNS) or folder
  return os.path.normpath(folder)


def finished(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, 'summary.json'))


def save(workdir: str, dest: str) -> bool:
  """Writes the record of the finished run in `workdir` to `dest` (replacing an older one);
  returns whether it wrote anything (False for an unfinished run or an up-to-date record).

  The gzip stream carries no file name or time, so the same run always gives the same bytes
  (a rerun of the sweep leaves committed records unchanged)."""
  if not finished(workdir):
    return False
  with open(os.path.join(workdir, METRICS), 'rb') as f:
    metrics = f.read()
  buffer = io.BytesIO()
  with gzip.GzipFile(filename='', mode='wb', fileobj=buffer, mtime=0) as z:
    z.write(metrics)
  files = {name: _read_bytes(os.path.join(workdir, name)) for name in COPIED}
  files[COMPRESSED] = buffer.getvalue()
  if all(_read_bytes(os.path.join(dest, n)) == b for n, b in files.items()):
    return False
  tmp = dest.rstrip(os.sep) + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name, content in files.items():
    with open(os.path.join(tmp, name), 'wb') as f:
      f.write(content)
  shutil.rmtree(dest, ignore_errors=True)
  os.replace(tmp, dest)  # a reader sees the old record or the new one, never half of one
  return True


def _read_bytes(path: str) -> bytes | None:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    return None


def open_metrics(folder: str) -> io.TextIOBase | None:
  """The metrics log of a run folder or record, as text; None if it has none."""
  if os.path.exists(os.path.join(folder, METRICS)):
    return open(os.path.join(folder, METRICS))
  if is_record(folder):
    return gzip.open(os.path.join(folder, COMPRESSED), 'rt')
  return None


def read_config(folder: str) -> dict[str, Any] | None:
  """A run folder's or record's config.json, or None if it has none (or a torn one)."""
  try:
    with open(os.path.join(folder, 'config.json')) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def pick(folders: list[str]) -> list[str]:
  """One folder per run from run folders and records found together, sorted by run: a finished
  run folder, else the run's record, else an unfinished run folder (a run resumed past its
  record is read from its folder once it finishes again)."""
  best: dict[str, tuple[int, str]] = {}
  for folder in folders:
    rank = 0 if finished(folder) and not is_record(folder) else 1 if is_record(folder) else 2
    key = run_path(folder)
    if key not in best or rank < best[key][0]:
      best[key] = (rank, folder)
  return [best[k][1] for k in sorted(best)]
