"""Throughput of the `local` GPT with RigL on 1, 2, 4, 8 emulated devices and on 2 processes.

  python benchmarks/scaling.py                    # every layout
  python benchmarks/scaling.py --layouts=1,8,2x4 --steps=10

A layout is `<devices>` (one process with that many emulated CPU devices, data parallel),
`<devices>f<fsdp>` (the same with mesh.fsdp), or `<processes>x<devices per process>` (that many
local processes through sift_jax.launch). Each layout runs in fresh processes; examples/s is the
median of --windows windows of --steps steps after compilation, each window holding exactly one
RigL mask update (sparsity.update_every_steps = --steps). Printed as a ratio to 1 device. On a
CPU the emulated devices share the same cores, so the ratio measures the overhead of sharding
and collectives, not a speed-up.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sift_jax import config_lib, experiment, launch, sharding, train  # noqa: E402

_LAYOUTS = flags.DEFINE_list('layouts', ['1', '2', '4', '8', '8f2', '2x1', '2x4'], 'Layouts.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per timing window (one mask update each).')
_WINDOWS = flags.DEFINE_integer('windows', 3, 'Timing windows; the median is reported.')
_SPARSITY = flags.DEFINE_float('sparsity', 0.75, 'RigL sparsity of the transformed layers.')
_WORKER = flags.DEFINE_string('worker_out', '', 'Internal: measure here, write JSON to this file.')
_FSDP = flags.DEFINE_integer('fsdp', 1, 'Internal: mesh.fsdp of a worker.')


def bench_config():
  c = config_lib.load_config(
    os.path.join(REPO, 'configs', 'gpt_small_dense.py'),
    f'local,rule=rigl,sparsity={_SPARSITY.value}',
  )
  c.total_steps = 10**6  # updates run throughout (end_fraction of a long run)
  c.sparsity.update_every_steps = _STEPS.value
  c.mesh.fsdp = _FSDP.value
  return c


def measure() -> dict[str, float]:
  """examples/s of the jitted train step in this process (one member of the cluster)."""
  c = bench_config()
  launch.initialize(c)
  exp = experiment.build_experiment(c)
  state = exp.new_state()
  step_fn = exp.train_step()
  n = _STEPS.value
  batches = [sharding.global_batch(exp.mesh, exp.dataset.train_batch(i)) for i in range(n)]
  for b in batches:  # compile, and align the windows with the update schedule
    state, m = step_fn(state, b)
  jax.block_until_ready(m)
  times = []
  for _ in range(_WINDOWS.value):
    t = time.perf_counter()
    for b in batches:
      state, m = step_fn(state, b)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / n)
  step_s = statistics.median(times)
  return {
    'examples_per_s': c.batch_size / step_s,
    'step_time_s': step_s,
    'devices': jax.device_count(),
    'processes': jax.process_count(),
    'density': float(jax.device_get(exp.sparsity_metrics()(state)['sparsity/density'])),
  }


def run_layout(layout: str) -> dict[str, float]:
  m = re.fullmatch(r'(\d+)(?:f(\d+))?|(\d+)x(\d+)', layout)
  if not m:
    raise ValueError(f'bad layout {layout!r}: use <devices>, <devices>f<fsdp> or <procs>x<devices>')
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'result.json')
    args = [
      f'--worker_out={out}',
      f'--steps={_STEPS.value}',
      f'--windows={_WINDOWS.value}',
      f'--sparsity={_SPARSITY.value}',
      f'--fsdp={m.group(2) or 1}',
    ]
    command = [sys.executable, os.path.abspath(__file__), *args]
    if m.group(3):
      code = launch.run_local(command, int(m.group(3)), int(m.group(4)))
      if code:
        raise RuntimeError(f'layout {layout}: a process exited with code {code}')
    else:
      env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={m.group(1)}'}
      done = subprocess.run(command, env=env, capture_output=True, text=True)
      if done.returncode:
        raise RuntimeError(f'layout {layout}: the worker failed:\n{done.stderr[-3000:]}')
    with open(out) as f:
      return json.load(f)


def main(argv):
  del argv
  train.use_compilation_cache()
  if _WORKER.value:
    result = measure()
    if jax.process_index() == 0:
      with open(_WORKER.value, 'w') as f:
        json.dump(result, f)
    return
  results = {}
  for layout in _LAYOUTS.value:
    results[layout] = run_layout(layout)
    print(f'{layout}: {results[layout]["examples_per_s"]:.1f} examples/s', flush=True)
  base = results.get('1', {}).get('examples_per_s')
  print(f'\nlocal GPT, RigL at sparsity {_SPARSITY.value}, {os.cpu_count()} CPU cores')
  print(f'{"layout":<8} {"procs":>5} {"devices":>7} {"examples/s":>11} {"step ms":>9} {"vs 1":>6}')
  for layout, r in results.items():
    ratio = f'{r["examples_per_s"] / base:6.2f}' if base else '     -'
    print(
      f'{layout:<8} {r["processes"]:5d} {r["devices"]:7d} {r["examples_per_s"]:11.1f} '
      f'{1e3 * r["step_time_s"]:9.1f} {ratio}'
    )


if __name__ == '__main__':
  app.run(main)
