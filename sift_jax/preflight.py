"""Preflight: does a config's train step lower for GPU and TPU, and how much device memory does it
need? Checked on this CPU, without the data, the accelerators or the parameters' memory.

  python -m sift_jax.preflight --config=configs/gpt_small_wide.py:sparsity=0.75,rule=rigl \\
    --config.sparsity.execution=block_sparse --config.sparsity.block_shape='(128, 128)' \\
    --platforms=cuda,tpu --devices=8 --config.mesh.fsdp=8 --device_memory=80GiB

The run's jitted train step is built at the config's full shapes from jax.ShapeDtypeStruct state
and batch (nothing allocated), sized by the dataset's meta as the trainer sizes it, and exported
(jax.export) for each platform with the kernels that platform runs: the block-sparse Pallas
kernel on cuda and tpu, not the XLA formulation the CPU falls back to, and the convolutions
`model.conv_impl=auto` picks there. The step is one program holding both the plain step and the
mask update (the rule's update runs under lax.cond on its update period), so lowering it lowers
both. With --devices=N > 1 it is sharded over the config's mesh of N devices; on this CPU they
are N host devices from XLA_FLAGS=--xla_force_host_platform_device_count=N, and the command
re-executes itself with that flag when the environment does not already set it to N.

Printed: per platform OK or the first line of its error; params, optimizer and sparsity state
bytes per device; the compiled footprint of the per-device program as XLA:CPU compiles it
(memory_analysis: argument + output - donated + temp), a CPU proxy for the accelerator's; with
--device_memory, the smallest optim.grad_accum_steps whose proxy footprint fits. Exit status 0
when every platform lowers (and, with --device_memory, some grad_accum_steps fits), 1 otherwise,
2 on a bad argument.

What it cannot see: lowering is not compiling. Mosaic (TPU, and Pallas' Mosaic GPU backend)
compiles the kernel while lowering, so its limits show here; a Triton kernel is compiled by
XLA:GPU, so its shared-memory and register limits show only on a GPU. And XLA:CPU does not
serialize the train step's unrolled microbatches, so the CPU proxy barely shrinks with
grad_accum_steps (GPT local at batch 256: 2.55 GiB at 1, 2.43 GiB at 8) where an accelerator's
memory-aware scheduler may do better: the count found may be more than a device needs, and
"nothing fits" may be wrong there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from sift_jax import config_lib, data, errors, experiment, models, registry, sharding, steps
from sift_jax.data.base import METAS
from sift_jax.sparse_layers import block_dense, conv

# jax.export platform -> the backend name JAX gives it (what per-backend choices are keyed by).
PLATFORMS = {'cpu': 'cpu', 'cuda': 'gpu', 'tpu': 'tpu'}
_UNITS = {
  '': 1,
  'b': 1,
  'kb': 10**3,
  'mb': 10**6,
  'gb': 10**9,
  'tb': 10**12,
  'kib': 2**10,
  'mib': 2**20,
  'gib': 2**30,
  'tib': 2**40,
}
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
# Custom-call targets jax.export refuses by default because their IR has no compatibility
# guarantee across jax versions (Pallas' Triton kernels on GPU): that matters to a program
# archived and run later, not to a check that it lowers, so preflight allows them.
ALLOW_KERNELS = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]


class PreflightError(errors.UserError, ValueError):
  """A bad preflight argument: an unknown platform, a memory size, a config it cannot size."""


def parse_platforms(value: str) -> tuple[str, ...]:
  """'cuda,tpu' -> ('cuda', 'tpu'); an unknown name raises naming the allowed ones."""
  names = tuple(p.strip() for p in value.split(',') if p.strip())
  unknown = [p for p in names if p not in PLATFORMS]
  if unknown or not names:
    raise PreflightError(
      f'--platforms={value!r}: unknown platform {", ".join(map(repr, unknown)) or "(none given)"}; '
      f'allowed: {", ".join(PLATFORMS)} (comma-separated)'
    )
  return names


def parse_bytes(value: str) -> int:
  """'80GiB' -> 85899345920 (B, KB/MB/GB/TB in powers of 10, KiB/MiB/GiB/TiB in powers of 2)."""
  m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*', value)
  unit = m and _UNITS.get(m.group(2).lower())
  if not unit or float(m.group(1)) <= 0:
    raise PreflightError(
      f'--device_memory={value!r} is not a positive size; write it like 80GiB or 16GB '
      '(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)'
    )
  return int(float(m.group(1)) * unit)


def human(n: float) -> str:
  """Bytes in binary units: 1536 -> '1.50 KiB'."""
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024:
      return f'{n:.0f} B' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  return f'{n:.2f} TiB'


def dataset_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The meta the model is sized by, refusing datasets whose meta needs the data loaded."""
  name = config.data.name
  registry.DATASETS.get(name)  # an unknown name: the registry's message lists the known
  if name not in METAS:
    raise PreflightError(
      f'data.name={name!r} cannot be sized without loading its data (its vocabulary comes from '
      f'the corpus); preflight sizes the model from a dataset meta known up front: '
      f'{", ".join(sorted(METAS))}'
    )
  return data.dataset_meta(config)


def platform_config(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """The config with `model.conv_impl=auto` resolved as it would be on `platform`'s backend."""
  if config.model.get('conv_impl', None) != 'auto':
    return config
  config = config.copy_and_resolve_references()
  config.model.conv_impl = conv.resolve_impl('auto', PLATFORMS[platform])
  return config


def block_impl(platform: str) -> str:
  """The block-sparse implementation `impl='auto'` runs on `platform`: the Pallas kernel on GPU
  and TPU (block_dense.default_impl, which asks this process's backend), else XLA's."""
  return 'pallas' if PLATFORMS[platform] in ('gpu', 'tpu') else 'xla'


@contextlib.contextmanager
def block_kernels(impl: str) -> Iterator[None]:
  """Traces the block-sparse layers with `impl` where they ask for the default (impl='auto'):
  this process's backend is the CPU, not the platform the program is lowered for."""
  with mock.patch.object(block_dense, 'default_impl', lambda: impl):
    yield


def abstract_batch(exp: experiment.Experiment) -> dict[str, jax.ShapeDtypeStruct]:
  """A global training batch of the config's shape, sharded along the batch as the trainer's."""
  c = exp.config
  x = models.example_input(c, exp.meta, batch_size=c.batch_size)
  # The next token at every position, or one class per image.
  labels = x.shape if exp.task == steps.TOKENS else x.shape[:1]
  s = sharding.batch_sharding(exp.mesh)
  return {
    exp.task.inputs: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    exp.task.labels: jax.ShapeDtypeStruct(labels, jnp.int32, sharding=s),
  }


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
  return int(
    sum(
      np.prod(a.sharding.shard_shape(a.shape), dtype=np.int64) * a.dtype.itemsize
      for a in jax.tree.leaves(tree)
    )
  )


def state_bytes(exp: experiment.Experiment) -> dict[str, int]:
  s = exp.abstract_state
  return {
    'params': per_device_bytes(s.params),
    'optimizer state': per_device_bytes(s.opt_state),
    'sparsity state': per_device_bytes(s.sparsity),
  }


def first_line(e: Exception) -> str:
  first = next((line for line in str(e).splitlines() if line.strip()), '')
  return f'{type(e).__name__}: {first.strip()}'


@dataclasses.dataclass(frozen=True)
class Lowering:
  """One platform's export of the train step."""

  exported: jax.export.Exported | None  # None when it failed
  error: str | None  # the first line of its error; None when it lowered
  seconds: float


def lower_platforms(
  config: ml_collections.ConfigDict, meta: Mapping[str, Any], platforms: Sequence[str]
) -> tuple[experiment.Experiment, dict[str, Lowering]]:
  """Exports the train step of `config` for each platform over this process's devices.

  Returns an Experiment of the config (for sizes and the CPU compile) and each platform's
  Lowering. Platforms running the same kernels share one jitted step, so its trace is reused.
  """
  exps, jitted, out = {}, {}, {}
  for p in platforms:
    c = platform_config(config, p)
    conv_impl = c.model.get('conv_impl', None)  # the only way platforms' experiments differ
    if conv_impl not in exps:
      exps[conv_impl] = experiment.build_experiment(c, meta)
    exp, key = exps[conv_impl], (conv_impl, block_impl(p))
    if key not in jitted:
      jitted[key] = exp.train_step()
    t = time.perf_counter()
    exported, error = None, None
    try:
      with block_kernels(block_impl(p)):
        export = jax.export.export(jitted[key], platforms=[p], disabled_checks=ALLOW_KERNELS)
        exported = export(exp.abstract_state, abstract_batch(exp))
    except Exception as e:  # any failure to lower is the answer, reported as one line
      error = first_line(e)
    out[p] = Lowering(exported, error, time.perf_counter() - t)
  return next(iter(exps.values())), out


@dataclasses.dataclass(frozen=True)
class Footprint:
  """XLA's memory analysis of one compiled per-device program, in bytes."""

  argument: int
  output: int
  donated: int  # output buffers that reuse donated argument buffers (the state)
  temp: int

  @property
  def total(self) -> int:
    return self.argument + self.output - self.donated + self.temp

  def __str__(self) -> str:
    return (
      f'{human(self.total)} (argument {human(self.argument)} + output {human(self.output)} '
      f'- donated {human(self.donated)} + temp {human(self.temp)})'
    )


def footprint(exp: experiment.Experiment, accum: int | None = None) -> Footprint:
  """The step compiled by this process's backend (the CPU: XLA formulations of the kernels) at
  `accum` gradient-accumulation steps (None: the config's), per device."""
  if accum is not None:
    config = exp.config.copy_and_resolve_references()
    config.optim.grad_accum_steps = accum
    experiment.validate_config(config)
    exp = dataclasses.replace(exp, config=config)
  # block_dense.default_impl picks this backend's kernels: the CPU's are XLA formulations.
  m = exp.train_step().lower(exp.abstract_state, abstract_batch(exp)).compile().memory_analysis()
  return Footprint(
    m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes
  )


def smallest_fitting_accum(
  exp: experiment.Experiment, budget: int, known: dict[int, Footprint]
) -> int | None:
  """The smallest optim.grad_accum_steps whose footprint is at most `budget` bytes, or None.

  Candidates divide the per-device batch, so every microbatch still splits evenly over the
  devices. The microbatch loop is unrolled, so a large count is slow to trace and compile: counts
  are tried doubling from 1 until one fits, then bisected down to the smallest that fits. The
  search gives up when the arguments and outputs alone (the state and the batch) exceed the
  budget, or when doubling the count no longer shrinks the footprint. `known` holds footprints
  already measured and gains the ones measured here.
  """
  per_device = exp.config.batch_size // exp.mesh.size
  candidates = [a for a in range(1, per_device + 1) if per_device % a == 0]

  def measure(i: int) -> Footprint:
    a = candidates[i]
    if a not in known:
      known[a] = footprint(exp, a)
    return known[a]

  i, last_over = 0, None  # last_over: the largest candidate index known not to fit
  while measure(i).total > budget:
    fp = measure(i)
    if fp.total - fp.temp > budget:
      return None
    if last_over is not None and fp.total >= measure(last_over).total:
      return None
    last_over = i
    i = next((j for j, a in enumerate(candidates) if a >= 2 * candidates[i]), None)
    if i is None:
      return None
  lo, hi = (0 if last_over is None else last_over + 1), i  # candidates[hi] fits
  while lo < hi:
    mid = (lo + hi) // 2
    if measure(mid).total <= budget:
      hi = mid
    else:
      lo = mid + 1
  return candidates[hi]


@dataclasses.dataclass(frozen=True)
class Report:
  mesh: dict[str, int]  # mesh axis -> devices along it
  lowered: dict[str, Lowering]  # by platform
  state: dict[str, int]  # per-device bytes of params, optimizer and sparsity state
  accum: int  # the config's optim.grad_accum_steps
  footprint: Footprint | None  # at `accum`; None when not compiled
  budget: int | None = None
  fit: int | None = None  # the smallest grad_accum_steps that fits in `budget`
  # grad_accum_steps -> its footprint, for every count compiled
  tried: dict[int, Footprint] = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    lowered = all(low.error is None for low in self.lowered.values())
    return lowered and (self.budget is None or self.fit is not None)


def preflight(
  config: ml_collections.ConfigDict,
  platforms: Sequence[str],
  *,
  compile_footprint: bool = True,
  device_memory: int | None = None,
) -> Report:
  """Lowers the train step of `config` for each platform over this process's devices (the
  config's mesh); with `compile_footprint`, compiles it here for its memory analysis, and with
  `device_memory` (bytes) finds the smallest grad_accum_steps that fits."""
  exp, lowered = lower_platforms(config, dataset_meta(config), platforms)
  accum = int(config.optim.grad_accum_steps)
  fp, fit, known = None, None, {}
  if compile_footprint or device_memory is not None:
    known[accum] = fp = footprint(exp)
  if device_memory is not None:
    fit = smallest_fitting_accum(exp, device_memory, known)
  mesh = dict(exp.mesh.shape)
  state = state_bytes(exp)
  return Report(mesh, lowered, state, accum, fp, device_memory, fit, dict(sorted(known.items())))


def format_report(report: Report) -> str:
  devices = int(np.prod(list(report.mesh.values())))
  mesh = ' x '.join(f'{k} {v}' for k, v in report.mesh.items())
  lines = [f'devices: {devices} (mesh {mesh})']
  for p, low in report.lowered.items():
    took = f'lowered in {low.seconds:.1f} s'
    lines.append(f'{p}: OK ({took})' if low.error is None else f'{p}: FAILED: {low.error}')
  lines.append('state per device: ' + ', '.join(f'{k} {human(v)}' for k, v in report.state.items()))
  backend = jax.default_backend()
  proxy = 'CPU proxy' if backend == 'cpu' else f'compiled for {backend}'
  if report.footprint is not None:
    lines.append(
      f'compiled footprint per device, {proxy} (grad_accum_steps={report.accum}): '
      f'{report.footprint}'
    )
  if report.budget is not None:
    tried = ', '.join(f'{a}: {human(fp.total)}' for a, fp in report.tried.items())
    lines.append(f'footprint by grad_accum_steps ({proxy}): {tried}')
    if report.fit is not None:
      lines.append(f'fits in {human(report.budget)} with optim.grad_accum_steps={report.fit}')
    elif report.footprint.total - report.footprint.temp > report.budget:
      lines.append(
        f'nothing fits in {human(report.budget)}: the state and the batch alone take '
        f'{human(report.footprint.total - report.footprint.temp)} per device; shard the state '
        '(mesh.fsdp) or use more devices'
      )
    else:
      lines.append(
        f'nothing fits in {human(report.budget)}: more gradient accumulation stops shrinking '
        'the footprint; shard the state (mesh.fsdp) or use more devices'
      )
  return '\n'.join(lines)


# --------------------------------------------------------------------------- command line


def _device_count_in_env() -> int:
  found = re.findall(rf'{_DEVICE_COUNT_FLAG}=(\d+)', os.environ.get('XLA_FLAGS', ''))
  return int(found[-1]) if found else 1


def reexec_with_devices(n: int) -> None:
  """Restarts this command with XLA_FLAGS giving n host devices, unless it already does: the
  flag is read once, when JAX starts its CPU backend."""
  if _device_count_in_env() == n:
    return
  kept = re.sub(rf'{_DEVICE_COUNT_FLAG}=\d+', '', os.environ.get('XLA_FLAGS', '')).strip()
  env = {**os.environ, 'XLA_FLAGS': f'{kept} {_DEVICE_COUNT_FLAG}={n}'.strip()}
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, '-m', 'sift_jax.preflight', *sys.argv[1:]], env)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  fl = flags.FLAGS
  try:
    platforms = parse_platforms(fl.platforms)
    budget = None if fl.device_memory is None else parse_bytes(fl.device_memory)
    if fl.devices < 1:
      raise PreflightError(f'--devices={fl.devices} must be a positive integer')
    if budget is not None and not fl.compile:
      raise PreflightError('--device_memory needs the compile (drop --nocompile)')
  except PreflightError as e:
    config_lib.fail(str(e))
  reexec_with_devices(fl.devices)
  if jax.device_count() != fl.devices:
    config_lib.fail(
      f'--devices={fl.devices} but JAX sees {jax.device_count()} {jax.default_backend()} '
      f'devices; run on the CPU (JAX_PLATFORMS=cpu) so {_DEVICE_COUNT_FLAG} applies'
    )
  config = fl.config
  try:
    report = preflight(config, platforms, compile_footprint=fl.compile, device_memory=budget)
  except (ValueError, errors.UserError) as e:
    config_lib.fail(str(e))
  print(format_report(report), flush=True)
  sys.exit(0 if report.ok else 1)


def define_flags() -> None:
  flags.DEFINE_string(
    'platforms',
    'cuda,tpu',
    f'Comma-separated jax.export platforms; allowed: {", ".join(PLATFORMS)}.',
  )
  flags.DEFINE_integer(
    'devices',
    1,
    'Devices the step is sharded over with the config mesh (mesh.data x mesh.fsdp). On the CPU '
    f'they come from XLA_FLAGS={_DEVICE_COUNT_FLAG}=N; the command re-executes itself with it '
    'when the environment does not set N.',
  )
  flags.DEFINE_bool(
    'compile',
    True,
    'Compile the step on this CPU for its memory analysis; --nocompile only lowers (faster).',
  )
  flags.DEFINE_string(
    'device_memory',
    None,
    'Memory of one device, e.g. 80GiB: also find the smallest optim.grad_accum_steps whose '
    'CPU-proxy footprint fits.',
  )


if __name__ == '__main__':
  # Flags are defined here, not at import, so importing this module defines no global flags.
  define_flags()
  _, _argv = config_lib.define_config_flag(sys.argv)
  app.run(main, argv=_argv)
