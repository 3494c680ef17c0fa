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
  """Appends to workdir/metrics.jsonl and TensorBoard events; only process 0 writes."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # imported here: slow, and only process 0 needs it

      # Open for the whole run: one line is appended and flushed per log step.
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')  # noqa: SIM115
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

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
  """The one-line progress report: step, loss, throughput, learning rate and ETA."""

  def __init__(self, total_steps: int, start_step: int, unit: str):
    self.total_steps = total_steps
    self.unit = unit
    self._t0 = time.perf_counter()
    self._s0 = start_step

  def line(self, step: int, scalars: Mapping[str, Any]) -> str:
    elapsed = time.perf_counter() - self._t0
    done = max(step - self._s0, 1)
    eta = elapsed / done * (self.total_steps - step)
    rate = scalars.get(f'train/{self.unit}_per_s', float('nan'))
    return (
      f'step {step}/{self.total_steps}  loss {scalars["train/loss"]:.4f}  '
      f'{rate:,.0f} {self.unit}/s  lr {scalars["train/lr"]:.3g}  ETA {_hms(eta)}'
    )


def _hms(seconds: float) -> str:
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
