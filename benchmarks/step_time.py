"""Train-step throughput and MFU of the dense models, against the matmul peak measured here.

  python benchmarks/step_time.py                 # all cases
  python benchmarks/step_time.py --cases=gpt_local --steps=20
  python benchmarks/step_time.py --cases=resnet18_local --variants=default,ynn_off

For each case: examples/s, step time, model FLOP/s (3 x analytical forward FLOPs per example,
docs/methods.md's convention) and MFU = model FLOP/s / the float32 matmul peak measured in the same
process. Timings are the median of --windows windows of --steps steps each, after compilation.
--variants compiles the same step with other XLA compiler options (step_time_xla.VARIANTS) and
times the variants in turns inside this one process, so their ratios hold on a shared machine.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
from absl import app, flags
from step_time_xla import VARIANTS, check_variants

from sift_jax import config_lib, experiment, hostmem, metrics, sharding, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
  # name: (config file, argument, overrides)
  'gpt_local': ('configs/gpt_small_dense.py', 'local', {}),
  'resnet18_local': ('configs/resnet18_cifar100.py', 'local', {}),
  'resnet18_cifar_full_width_b128': (
    'configs/resnet18_cifar100.py',
    'local',
    {'model.width': 64, 'batch_size': 128},
  ),
}

_CASES = flags.DEFINE_list('cases', list(CASES), f'Cases to run, from {list(CASES)}.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per timing window.')
_WINDOWS = flags.DEFINE_integer('windows', 3, 'Timing windows; the median is reported.')
_VARIANTS = flags.DEFINE_list('variants', ['default'], f'XLA option sets, from {list(VARIANTS)}.')
_DTYPE = flags.DEFINE_string('dtype', None, 'Overrides model.dtype (e.g. bfloat16).')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Overrides batch_size in every case.')


def case_config(name: str):
  path, arg, overrides = CASES[name]
  c = config_lib.load_config(os.path.join(REPO, path), arg)
  for key, value in overrides.items():
    group, _, leaf = key.rpartition('.')
    (c[group] if group else c)[leaf] = value
  if _DTYPE.value:
    c.model.dtype = _DTYPE.value
  if _BATCH.value:
    c.batch_size = _BATCH.value
  c.total_steps = 10**6  # keeps every step inside the schedule's warm part; nothing is saved
  return c


def footprint(compiled) -> int:
  """Bytes a compiled step holds at its peak: arguments, outputs and temporaries, less the
  outputs that reuse donated arguments' buffers."""
  m = compiled.memory_analysis()
  return (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def measure(name: str, peak: float) -> dict[str, dict[str, float]]:
  """Per variant: examples/s, step time, model GFLOP/s and MFU of one case."""
  c = case_config(name)
  exp = experiment.build_experiment(c)
  batches = [
    sharding.global_batch(exp.mesh, exp.dataset.train_batch(i)) for i in range(_STEPS.value)
  ]
  lowered = exp.train_step().lower(exp.new_state(), batches[0])
  step_bytes = footprint(lowered.compile())
  steps, states, times = {}, {}, {}
  for v in _VARIANTS.value:
    steps[v] = lowered.compile(compiler_options=VARIANTS[v])
    states[v], m = steps[v](exp.new_state(), batches[0])  # warm-up
    jax.block_until_ready(m)
    times[v] = []
  for _ in range(_WINDOWS.value):
    for v in _VARIANTS.value:
      t = time.perf_counter()
      for b in batches:
        states[v], m = steps[v](states[v], b)
      jax.block_until_ready(m)
      times[v].append((time.perf_counter() - t) / len(batches))
  flops_per_step = 3 * exp.flop_report.forward_dense * c.batch_size
  results = {}
  for v, ts in times.items():
    step_s = statistics.median(ts)
    results[v] = {
      'examples_per_s': c.batch_size / step_s,
      'step_time_s': step_s,
      'model_gflops_per_s': flops_per_step / step_s / 1e9,
      'mfu': flops_per_step / step_s / peak,
      'step_bytes': step_bytes,
    }
  return results


def main(argv):
  del argv
  check_variants(_VARIANTS.value)
  train.use_compilation_cache()
  heap = hostmem.keep_freed_memory()  # as the trainer does on CPU
  peak = metrics.matmul_peak_flops()
  print(
    f'device: {jax.devices()[0].device_kind} x {jax.device_count()}, heap kept: {heap}, '
    f'float32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3, best of 5)'
  )
  print(f'{"case":<34} {"variant":<10} {"examples/s":>11} {"step ms":>9} {"GFLOP/s":>9} {"MFU":>6}')
  for name in _CASES.value:
    if name not in CASES:
      raise ValueError(f'unknown case {name!r}; known: {", ".join(CASES)}')
    for v, r in measure(name, peak).items():
      print(
        f'{name:<34} {v:<10} {r["examples_per_s"]:11.1f} {1e3 * r["step_time_s"]:9.1f} '
        f'{r["model_gflops_per_s"]:9.1f} {r["mfu"]:6.3f}',
        flush=True,
      )


if __name__ == '__main__':
  app.run(main)
