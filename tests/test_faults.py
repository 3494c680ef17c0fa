"""Fault injection: SIGKILL a tiny run at seeded random moments, then rerun it to the end.

Each of the 20 trials kills one run, either after a random delay or inside a checkpoint save
(as soon as orbax's temporary folder of a random checkpoint appears, plus a random few ms),
reruns the same command and checks that summary.json holds the uninterrupted run's numbers.
"""

from __future__ import annotations

import json
import os
import random
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
