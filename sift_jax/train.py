"""The one trainer: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config, take the workdir, build data, model, optimizer and sparsity
rule (experiment.py), initialise or resume the state (the workdir policy of workdir.py), then loop
over the jitted steps (steps.py) with logging, health checks (health.py), evaluation and
checkpoints, and write the run's summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import tqdm
from absl import logging

from sift_jax import (
  checkpointing,
  errors,
  hostmem,
  launch,
  plugins,
  preemption,
  sharding,
  sparsity,
  steps,
)
from sift_jax import experiment as experiment_lib
from sift_jax import metrics as metrics_lib
from sift_jax import workdir as workdir_lib
from sift_jax.analysis import spectral
from sift_jax.config_lib import SAVED_CONFIG
from sift_jax.experiment import Experiment
from sift_jax.health import Health, NonFiniteLossError, uniform_loss

MODES = ('train', 'eval')


class Preempted(Exception):
  """SIGTERM/SIGINT (or a multi-host preemption notice): a checkpoint was saved, exit 0."""


def use_compilation_cache() -> None:
  """A persistent XLA cache, so reruns and the test suite do not recompile the same steps."""
  cache = os.environ.get('SIFT_JAX_COMPILATION_CACHE') or os.path.join(
    os.path.expanduser('~'), '.cache', 'sift_jax', 'xla'
  )
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  mode: str = 'train',
  imports: Sequence[str] = (),
) -> dict[str, Any]:
  """Trains (or, with mode='eval', evaluates the latest checkpoint); returns the summary.

  `imports`: the modules the command line imported (--import), recorded with the config when
  training starts (plugins.record) so eval and resume import them again.

  Rerunning a finished run leaves its outputs as they are (or rebuilds a missing summary.json
  from its last checkpoint and metrics row) and says so. A full disk, a read-only workdir or a
  workdir that is a file raise errors.WorkdirError naming the path; a workdir another trainer
  holds raises workdir.WorkdirBusyError naming its pid.
  """
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; known: {", ".join(MODES)}')
  t_start = time.time()
  use_compilation_cache()
  launch.initialize(config)  # before anything touches a device (the guard asks process_count)
  if jax.default_backend() == 'cpu':
    hostmem.keep_freed_memory()
  try:
    with preemption.PreemptionGuard() as guard:
      return run(config, workdir, mode, guard, t_start, imports)
  except errors.UserError:
    raise
  except Exception as e:
    problem = errors.workdir_error(e, workdir)
    if problem is None:
      raise
    raise problem from e


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  mode: str,
  guard,
  t_start: float,
  imports: Sequence[str] = (),
) -> dict[str, Any]:
  """train_and_evaluate's body, inside the preemption guard."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.WorkdirError(f'--workdir={workdir} is a file, not a folder: pass a folder path')
  experiment_lib.validate_config(config)  # names and numbers: a typo leaves no folder behind
  os.makedirs(workdir, exist_ok=True)
  with hold(workdir):
    saved_total_steps = workdir_lib.check_workdir_config(config, workdir)
    exp = experiment_lib.build_experiment(config)
    ckpt = checkpointing.Checkpointer(workdir, config.checkpoint.keep)
    try:
      restored = experiment_lib.restore(exp, ckpt)
      if mode == 'eval':
        return evaluate_checkpoint(exp, workdir, restored, ckpt)
      if restored is None:
        workdir_lib.check_fresh_start(workdir)
        state, start_step = exp.new_state(), 0
      else:
        state, start_step = restored
      if start_step > config.total_steps:
        raise workdir_lib.RunStateError(
          f'{ckpt.directory} holds step {start_step}, past total_steps={config.total_steps}: '
          'raise --config.total_steps or pass a new --workdir'
        )
      if start_step == config.total_steps:
        return finished_summary(exp, workdir, state, t_start)
      # Only now, with every check passed and steps left to train, is this config the run's.
      metrics_lib.write_json(os.path.join(workdir, SAVED_CONFIG), json.loads(config.to_json()))
      plugins.record(workdir, imports)
      if start_step:
        announce(f'resumed from step {start_step} of {config.total_steps} ({ckpt.directory})')
        if saved_total_steps is not None:
          announce(
            f'total_steps changed from {saved_total_steps} to {config.total_steps}: the '
            'learning-rate and sparsity schedules follow the new length from here'
          )
      writer = metrics_lib.MetricWriter(workdir, start_step)
      try:
        state, final = train_loop(exp, state, start_step, ckpt, writer, guard)
      finally:
        writer.close()
    finally:
      ckpt.wait()
      ckpt.close()
    return write_summary(exp, workdir, state, final, start_step, t_start)


def hold(workdir: str) -> contextlib.AbstractContextManager:
  """The workdir's trainer lock for the run's life, taken by process 0 (the processes of one
  multi-host run share the workdir)."""
  if jax.process_index() != 0:
    return contextlib.nullcontext()
  return workdir_lib.trainer_lock(workdir)


def announce(message: str) -> None:
  """A line for the console (process 0), also logged; above a progress bar, if one is shown."""
  logging.info(message)
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def evaluate_checkpoint(exp: Experiment, workdir: str, restored, ckpt) -> dict[str, Any]:
  """--mode=eval: evaluates the latest checkpoint, prints the result and writes eval.json."""
  if restored is None:
    raise FileNotFoundError(f'--mode=eval needs a checkpoint; {ckpt.directory} has none')
  state, step = restored
  result = {
    'step': step,
    **steps.evaluate(exp.eval_step(), state, exp.dataset, exp.mesh, exp.task),
  }
  announce(f'eval at step {step}: {metrics_lib.format_scalars(result, "eval/")}')
  if not math.isfinite(result['eval/loss']):
    raise NonFiniteLossError(
      f'eval/loss={result["eval/loss"]} at step {step}: checkpoint {ckpt.directory}/{step} '
      'holds a diverged state'
    )
  metrics_lib.write_json(os.path.join(workdir, 'eval.json'), result)
  return result


def finished_summary(exp: Experiment, workdir: str, state, t_start: float) -> dict[str, Any]:
  """A rerun of a finished run: keeps summary.json, or rebuilds it whole if it is missing."""
  path = os.path.join(workdir, workdir_lib.SUMMARY)
  step = exp.config.total_steps
  if os.path.exists(path):
    announce(f'run in {workdir} already finished at step {step}; its outputs are left as they are')
    with open(path) as f:
      return json.load(f)
  rows = [r for r in metrics_lib.read_rows(workdir) if r['step'] == step]
  if not rows:
    raise workdir_lib.RunStateError(
      f'{workdir} has the final checkpoint (step {step}) but neither summary.json nor the '
      'final row of metrics.jsonl; evaluate it with --mode=eval'
    )
  announce(f'run in {workdir} finished at step {step} without summary.json; rebuilt it')
  final = {k: v for k, v in rows[-1].items() if k != 'step'}
  return write_summary(exp, workdir, state, final, step, t_start)


def write_summary(exp: Experiment, workdir: str, state, final, start_step: int, t_start: float):
  summary = metrics_lib.plain(
    {
      **final,
      **experiment_lib.run_facts(state, exp),
      'resumed_from_step': start_step,
      'wall_time_s': time.time() - t_start,
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      **metrics_lib.provenance(),
    }
  )
  metrics_lib.write_json(os.path.join(workdir, workdir_lib.SUMMARY), summary)
  return summary


def train_loop(exp: Experiment, state, start_step: int, ckpt, writer, guard):
  """Runs steps start_step+1 .. total_steps; returns (final state, last logged metrics)."""
  config, dataset = exp.config, exp.dataset
  total = config.total_steps
  step_fn = first_step_announced(exp.train_step(), start_step + 1)
  eval_step, sparsity_metrics = exp.eval_step(), exp.sparsity_metrics()
  params_finite = exp.params_finite()
  health = Health(uniform_loss(exp.meta), ckpt)
  final: dict[str, Any] = {}
  batches = dataset.train_iterator(start_step)
  t_last, s_last = time.perf_counter(), start_step
  with metrics_lib.Progress(total, start_step, exp.task.unit, enabled=config.progress) as progress:
    for step in range(start_step + 1, total + 1):
      state, step_metrics = step_fn(state, sharding.global_batch(exp.mesh, next(batches)))
      ckpt.check_save()  # a failed save stops the run here, not at the next save
      if guard.requested or ckpt.reached_preemption(step):
        health.check(jax.device_get(step_metrics), step, params_finite(state))
        ckpt.save(step, state)
        ckpt.wait()
        raise Preempted(
          f'{guard.signal_name or "preemption"} received: saved a checkpoint at step {step} '
          f'in {ckpt.directory}; rerun with --workdir={ckpt.workdir} to resume'
        )
      is_eval = every(step, config.eval_every_steps) or step == total
      is_log = every(step, config.log_every_steps) or is_eval
      is_ckpt = every(step, config.checkpoint_every_steps) or step == total
      if not (is_log or is_ckpt):
        continue
      row = jax.device_get(step_metrics)  # device-to-host only on log and checkpoint steps
      if is_log:
        now = time.perf_counter()
        row.update(experiment_lib.throughput(exp, (now - t_last) / (step - s_last)))
        row.update(jax.device_get(sparsity_metrics(state)))
        densities = sparsity.layer_densities_from_metrics(row)
        row['flops/train_per_example'] = experiment_lib.train_flops(exp, densities, step)
        if exp.sift_flops is not None:
          row['sparsity/solved_level'] = exp.sift_flops.mask_level
        if is_eval:
          row.update(steps.evaluate(eval_step, state, dataset, exp.mesh, exp.task))
          if config.analysis.spectral:  # host-side eigensolves: eval steps only
            row.update(spectral.state_metrics(experiment_lib.masked_view(state, exp)))
      # Before anything is written: a diverged step neither logs nor saves.
      health.check(row, step, params_finite(state) if is_ckpt else True)
      if is_log:
        writer.write(step, row)
        final.update(row)
        progress.update(step, row)
        t_last, s_last = time.perf_counter(), step  # eval time is not step time
      if is_ckpt:
        ckpt.save(step, state)
  return state, final


def first_step_announced(step_fn, first: int):
  """The jitted step, whose first call is compiled apart and timed: the console hears from the
  run long before its first log step, which can be minutes away on a loaded machine."""
  pending = True

  def step(state, batch):
    nonlocal pending
    if not pending:
      return step_fn(state, batch)
    pending = False
    t0 = time.perf_counter()
    step_fn.lower(state, batch).compile()  # jit reuses this executable: no second compile
    t1 = time.perf_counter()
    out = jax.block_until_ready(step_fn(state, batch))
    announce(
      f'compiled the train step in {t1 - t0:.1f} s; step {first} took '
      f'{time.perf_counter() - t1:.2f} s'
    )
    return out

  return step


def every(step: int, period: int) -> bool:
  return bool(period) and step % period == 0
