"""A new user's first hour: the `smoke` preset, and names that say what a run is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sift_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('path', config_lib.known_configs())
def test_every_config_has_a_smoke_preset_of_its_local_run(path):
  local = config_lib.load_config(path, 'local,sparsity=0.5,rule=rigl')
  smoke = config_lib.load_config(path, 'smoke,sparsity=0.5,rule=rigl')
  assert (smoke.model, smoke.data, smoke.sift) == (local.model, local.data, local.sift)
  assert smoke.total_steps == config_lib.SMOKE_STEPS < local.total_steps
  # It still logs, evaluates and checkpoints, and RigL updates its masks, within the run.
  assert smoke.total_steps % smoke.log_every_steps == 0
  assert smoke.eval_every_steps == smoke.checkpoint_every_steps == smoke.total_steps
  assert smoke.sparsity.update_every_steps < smoke.total_steps * smoke.sparsity.end_fraction
  assert smoke.sparsity.rule == 'rigl' and smoke.sparsity.level == 0.5


def test_smoke_round_trips_through_the_argument_forms():
  args = config_lib.parse_arg('smoke,sift=wide')
  assert args['smoke'] and args['local'] and config_lib.join_arg(args) == 'smoke,sift=wide'
  assert config_lib.join_arg(config_lib.parse_arg('local,seed=1')) == 'local,seed=1'
  with pytest.raises(config_lib.ConfigError, match='allowed: local, smoke, sift='):
    config_lib.parse_arg('smoek')


@pytest.mark.slow
def test_the_smoke_run_of_the_main_job_finishes(tmp_path):
  """The README's first command at `smoke`: every part of the loop; ~30 s on a quiet 2-core CPU."""
  start = time.monotonic()
  out = subprocess.run(
    [sys.executable, '-m', 'sift_jax.main', '--config=configs/gpt_small_wide.py:smoke']
    + [f'--workdir={tmp_path / "run"}'],
    cwd=tmp_path,
    env={**os.environ, 'PYTHONPATH': REPO},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  last = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[-1])
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert last['step'] == config_lib.SMOKE_STEPS and summary['eval/loss'] < 4.0  # ln 256 = 5.5
  print(f'smoke run: {time.monotonic() - start:.1f} s wall')
