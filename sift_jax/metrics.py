"""Run outputs: metrics.jsonl, TensorBoard events, summary.json, the progress line, MFU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'ml-collections')


def plain(value: Any) -> Any:
  """JSON-ready Python value from numpy/jax scalars, arrays and nested maps."""
  if isinstance(value, Mapping):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


class MetricWriter:
  """Writes workdir/metrics.jsonl and TensorBoard events; only process 0 writes.

  A resumed run replays the steps after its checkpoint, so the rows (and TensorBoard events)
  past `start_step` are dropped first: the file holds each step once, the later value winning.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # imported here: slow, and only process 0 needs it

      path = os.path.join(workdir, 'metrics.jsonl')
      kept = [r for r in read_rows(workdir) if r['step'] <= start_step]
      tmp = path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(tmp, path)
      # Open for the whole run: one line is appended and flushed per log step.
      self._jsonl = open(path, 'a')  # noqa: SIM115
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=start_step + 1)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    row = {'step': int(step), **plain(dict(scalars))}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for k, v in row.items():
      if k != 'step' and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def read_rows(workdir: str) -> list[dict[str, Any]]:
  """The rows of workdir/metrics.jsonl; a last line cut short by a kill is skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue
  return rows


def format_scalars(scalars: Mapping[str, Any], prefix: str) -> str:
  """'loss 2.3026  accuracy 0.1' for the keys under `prefix` (e.g. 'eval/')."""
  return '  '.join(
    f'{k[len(prefix) :]} {v:.4g}'
    for k, v in sorted(scalars.items())
    if k.startswith(prefix) and isinstance(v, (int, float))
  )


def write_json(path: str, obj: Mapping[str, Any]) -> None:
  """Writes JSON atomically (temp file + rename), from process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(plain(dict(obj)), f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def provenance() -> dict[str, Any]:
  """Where a run came from: git commit and dirty flag, library versions, command line."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args: str) -> str:
    try:
      out = subprocess.run(['git', *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
      return ''
    return out.stdout.strip() if out.returncode == 0 else ''

  versions = {}
  for lib in LIBRARIES:
    try:
      versions[f'version/{lib}'] = metadata.version(lib)
    except metadata.PackageNotFoundError:
      versions[f'version/{lib}'] = 'not installed'
  return {
    'git_sha': git('rev-parse', 'HEAD') or 'unknown',
    'git_dirty': bool(git('status', '--porcelain', '--untracked-files=no')),
    'command_line': ' '.join([sys.executable, *sys.argv]),
    'python_version': sys.version.split()[0],
    **versions,
  }


class Progress:
  """The progress report: step, loss, throughput, learning rate, ETA, and eval on eval steps.

  On a terminal it is a tqdm bar whose eval results stay above it; into a file or pipe it is
  one plain line per log step (a bar's carriage returns would garble logs). Process 0 only.
  """

  def __init__(self, total_steps: int, start_step: int, unit: str, enabled: bool = True):
    self.total_steps = total_steps
    self.unit = unit
    self.enabled = enabled and jax.process_index() == 0
    self._t0 = time.perf_counter()
    self._s0 = start_step
    self._bar = None
    if self.enabled and sys.stdout.isatty():
      self._bar = tqdm.tqdm(
        total=total_steps, initial=start_step, unit='step', dynamic_ncols=True, file=sys.stdout
      )

  def line(self, step: int, scalars: Mapping[str, Any]) -> str:
    elapsed = time.perf_counter() - self._t0
    done = max(step - self._s0, 1)
    eta = elapsed / done * (self.total_steps - step)
    return f'step {step}/{self.total_steps}  {self._postfix(scalars)}  ETA {hms(eta)}'

  def update(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    if self._bar is None:
      print(self.line(step, scalars), flush=True)
      return
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix_str(self._postfix(scalars), refresh=True)
    evals = format_scalars(scalars, 'eval/')
    if evals:
      self._bar.write(f'step {step}/{self.total_steps}  eval {evals}', file=sys.stdout)

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    if self._bar is not None:
      self._bar.close()

  def _postfix(self, scalars: Mapping[str, Any]) -> str:
    rate = scalars.get(f'train/{self.unit}_per_s', float('nan'))
    text = (
      f'loss {scalars["train/loss"]:.4f}  {rate:,.0f} {self.unit}/s  lr {scalars["train/lr"]:.3g}'
    )
    evals = format_scalars(scalars, 'eval/')
    if evals and self._bar is None:
      text += f'  eval {evals}'
    return text


def hms(seconds: float) -> str:
  """H:MM:SS, or '?' for an unknown (infinite or NaN) duration."""
  if not math.isfinite(seconds):
    return '?'
  s = int(seconds)
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """Measured FLOP/s of a square matmul on the default device: the ceiling MFU is quoted against."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best
