"""Fault injection: SIGKILL a tiny run at seeded random moments, then rerun it to the end; and
the workdir's holes: reruns of a finished run, two trainers on one workdir, a failed save.

Each of the 20 trials kills one run, either after a random delay or inside a checkpoint save
(as soon as orbax's temporary folder of a random checkpoint appears, plus a random few ms),
reruns the same command and checks that summary.json holds the uninterrupted run's numbers.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL, EVERY = 60, 10
FLAGS = [
  f'--config={REPO}/configs/mlp_fashion_mnist.py:local',
  '--config.data.name=digits',
  '--config.model.hidden=(32,)',
  f'--config.total_steps={TOTAL}',
  f'--config.checkpoint_every_steps={EVERY}',
  '--config.log_every_steps=5',
  '--config.eval_every_steps=20',
  '--config.eval.max_examples=64',
  '--config.checkpoint.keep=2',
]
# Wall time, where the run came from, and how it got there differ between runs by design.
VARYING = ('wall_time_s', 'resumed_from_step', 'command_line', 'git_', 'version/', 'python_')
VARYING += ('train/step_time_s', 'train/examples_per_s')


def command(workdir) -> list[str]:
  return [sys.executable, '-m', 'sift_jax.main', *FLAGS, f'--workdir={workdir}']


def comparable(workdir) -> dict:
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  return {k: v for k, v in summary.items() if not k.startswith(VARYING)}


def run_to_the_end(workdir) -> None:
  out = subprocess.run(command(workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]


def kill_inside_a_save(proc, workdir, step: int, delay_s: float) -> None:
  ckpts = os.path.join(workdir, 'checkpoints')
  prefix = f'{step}.orbax-checkpoint-tmp'
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if os.path.isdir(ckpts) and any(p.startswith(prefix) for p in os.listdir(ckpts)):
      time.sleep(delay_s)
      break
    time.sleep(0.001)
  proc.kill()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_gives_the_uninterrupted_summary(tmp_path):
  t0 = time.time()
  run_to_the_end(tmp_path / 'straight')
  reference, duration = comparable(tmp_path / 'straight'), time.time() - t0
  assert reference['train/loss'] > 0 and 'eval/accuracy' in reference
  rng = random.Random(0)
  resumed, interrupted_saves = [], 0
  for trial in range(20):
    workdir = tmp_path / f'trial{trial}'
    proc = subprocess.Popen(
      command(workdir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if trial % 2:
      kill_inside_a_save(
        proc, workdir, EVERY * rng.randint(1, TOTAL // EVERY), rng.uniform(0, 0.02)
      )
    else:
      time.sleep(rng.uniform(0, 1.2 * duration))
      proc.kill()
    proc.wait()
    interrupted_saves += os.path.isdir(workdir / 'checkpoints') and any(
      'tmp' in p for p in os.listdir(workdir / 'checkpoints')
    )
    run_to_the_end(workdir)
    assert comparable(workdir) == reference, f'trial {trial}'
    with open(workdir / 'metrics.jsonl') as f:
      steps = [json.loads(line)['step'] for line in f]
    assert steps == sorted(set(steps)), f'trial {trial}: {steps}'
    with open(workdir / 'summary.json') as f:
      resumed.append(json.load(f)['resumed_from_step'])
  # The kills landed at different moments, some of them inside a save.
  assert len(set(resumed)) >= 4 and interrupted_saves >= 3, (resumed, interrupted_saves)


# --------------------------------------------------------------------------- workdir holes


def run_main(workdir, *flags: str, config: bool = True) -> subprocess.CompletedProcess:
  """sift_jax.main on the tiny digits MLP (FLAGS), then `flags`; config=False: --workdir alone."""
  argv = [sys.executable, '-m', 'sift_jax.main', *(FLAGS if config else []), *flags]
  return subprocess.run(
    [*argv, f'--workdir={workdir}'], cwd=REPO, capture_output=True, text=True, timeout=600
  )


def snapshot(workdir) -> dict[str, tuple[bytes, int]]:
  """Every file of a run folder with its bytes and mtime, but the trainer's lock file (which
  names its latest holder)."""
  out = {}
  for folder, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(folder, name)
      if name != 'trainer.lock':
        with open(path, 'rb') as f:
          out[os.path.relpath(path, workdir)] = (f.read(), os.stat(path).st_mtime_ns)
  return out


def test_no_rerun_of_a_finished_run_touches_its_files(tmp_path):
  first = run_main(tmp_path, '--config.total_steps=20')
  assert first.returncode == 0, first.stderr[-3000:]
  before = snapshot(tmp_path)
  assert 'config.json' in before and 'summary.json' in before
  shorter = run_main(tmp_path, '--config.total_steps=10')
  assert shorter.returncode == 2, shorter.stderr[-3000:]
  assert 'holds step 20, past total_steps=10' in shorter.stderr
  assert snapshot(tmp_path) == before  # config.json still says 20
  for rerun in (run_main(tmp_path, config=False), run_main(tmp_path, '--config.total_steps=20')):
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 'already finished at step 20; its outputs are left as they are' in rerun.stdout
    assert snapshot(tmp_path) == before


def test_a_by_hand_rerun_of_a_finished_sweep_run_leaves_the_sweep_done(tmp_path):
  from sift_jax import sweep

  path = tmp_path / 'sweep.py'
  path.write_text(
    'def get_sweep():\n'
    f'  return {{"config": "{REPO}/configs/mlp_fashion_mnist.py:local", "fixed": '
    '{"data.name": "digits", "model.hidden": (32,), "total_steps": 10, "batch_size": 16, '
    '"eval.max_examples": 64, "progress": False}, "overrides": [{"seed": 0}]}\n'
  )
  env = {**os.environ, 'PYTHONPATH': REPO}

  def sweep_cli(*flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, '-m', 'sift_jax.sweep', str(path), *flags]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

  done = sweep_cli()
  assert done.returncode == 0 and 'sweep finished: 1/1 done, 0 failed' in done.stdout, done
  (run,) = sweep.make_runs(str(path))
  assert sweep.progress(run) == ('done', '')
  before = snapshot(run.workdir)
  (line,) = sweep_cli('--print_commands').stdout.splitlines()
  by_hand = subprocess.run(
    [sys.executable, *shlex.split(line)[1:]], cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert by_hand.returncode == 0, by_hand.stderr[-3000:]
  assert 'already finished' in by_hand.stdout
  assert snapshot(run.workdir) == before
  assert sweep.progress(run) == ('done', '')
  again = sweep_cli()
  assert again.returncode == 0 and '1 runs: 1 done, 0 to run' in again.stdout, again


def test_a_second_trainer_on_a_workdir_stops_at_once_naming_the_first(tmp_path):
  first = subprocess.Popen(
    [*command(tmp_path), '--config.total_steps=100000', '--config.checkpoint_every_steps=100000'],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / 'metrics.jsonl').exists():
      assert first.poll() is None, first.communicate()[1][-3000:]
      time.sleep(0.05)
    second = run_main(tmp_path, '--config.total_steps=100000')
    # An eval too: it would read (and tidy) the checkpoints being written.
    evaluation = run_main(tmp_path, '--mode=eval', config=False)
  finally:
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
  assert second.returncode == 2, second.stderr[-3000:]
  assert second.stderr.splitlines() == [
    f'error: --workdir={tmp_path} is in use by another trainer ({socket.gethostname()} pid '
    f'{first.pid}); wait for it to finish or stop it, or pass another --workdir'
  ]
  assert evaluation.returncode == 2 and 'in use by another trainer' in evaluation.stderr
  assert first.returncode == 0, err[-3000:]  # the first ran on, undisturbed
  assert f'rerun with --workdir={tmp_path} to resume' in out


def test_a_failed_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
  from test_train import tiny_config

  from sift_jax import checkpointing, errors, sharding, train

  c = tiny_config()
  c.update(total_steps=300, checkpoint_every_steps=100, log_every_steps=100, eval_every_steps=300)
  batches, failed_at = [], []
  real_batch, real_seal = sharding.global_batch, checkpointing._write_json_atomic

  def slow_batch(mesh, local):  # one call per train step: steps of 5 ms count the steps
    time.sleep(0.005)
    batches.append(1)
    return real_batch(mesh, local)

  def full_disk_at_200(path, obj):  # the end of orbax's save, on its thread
    if '/200.orbax-checkpoint-tmp' in path:
      failed_at.append(len(batches))
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real_seal(path, obj)

  monkeypatch.setattr(sharding, 'global_batch', slow_batch)
  monkeypatch.setattr(checkpointing, '_write_json_atomic', full_disk_at_200)
  with pytest.raises(errors.WorkdirError, match='200.orbax-checkpoint-tmp.*the disk is full'):
    train.train_and_evaluate(c, str(tmp_path))
  (failed,) = failed_at
  # Stopped at the step boundary after the failure (one more step at most, if it was running),
  # not at the save of step 300; checkpoint 100 is still the last good one.
  assert 200 <= failed <= len(batches) <= failed + 1 < 300, (failed, len(batches))
  assert [s for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()] == ['100']
