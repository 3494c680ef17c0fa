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


def write_run(folder, sift: str, rule: str, level: float, seed: int) -> None:
  """The three files the report reads, for a 20-step image run."""
  folder.mkdir(parents=True)
  config = {'seed': seed, 'total_steps': 20, 'batch_size': 8, 'model': {'name': 'mlp'}}
  config |= {'sift': {'name': sift}, 'sparsity': {'rule': rule, 'level': level}}
  (folder / 'config.json').write_text(json.dumps(config))
  rows = [{'step': s, 'train/loss': 1.0, 'eval/accuracy': 0.5 + seed / 100} for s in (10, 20)]
  (folder / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  summary = {'eval/accuracy': 0.5 + seed / 100, 'eval/loss': 1.0, 'sparsity/density': 1 - level}
  (folder / 'summary.json').write_text(json.dumps(summary))


@pytest.mark.parametrize('levels_vary', [True, False])
def test_an_untransformed_sparse_model_is_never_labelled_dense(tmp_path, levels_vary):
  """sift.name 'dense' means no Sparse-IFT transformation: beside a sparsity the report calls it
  sift=none, whether or not the sparsity varies across the study, and keeps 'dense' for the
  dense model and in results.csv."""
  from sift_jax.analysis import report, tables

  runs = [('dense', 'rigl', 0.5), ('wide', 'rigl', 0.5)]
  runs += [('dense', 'dense', 0.0)] if levels_vary else []
  for sift, rule, level in runs:
    for seed in (0, 1):
      write_run(tmp_path / 'runs' / f'{sift}-{rule}-{seed}', sift, rule, level, seed)
  out = report.write_report(str(tmp_path))
  assert out['setting_keys'][:3] == ['sift.name', 'sparsity.rule', 'sparsity.level']
  table = out['table'].split('\n\n')[0]
  assert '| none | rigl | 0.5 | 2 |' in table and '| wide | rigl | 0.5 | 2 |' in table
  assert ('| dense | dense | 0.0 | 2 |' in table) == levels_vary
  assert report.short_label(
    {'sift.name': 'dense', 'sparsity.rule': 'rigl', 'sparsity.level': 0.5}
  ) == ('sift=none / rigl / s=0.5')
  assert tables.label({'sift.name': 'dense', 'sparsity.level': 0.5}) == 'sift=none, s=0.5'
  assert 'dense,rigl,0.5' in (tmp_path / 'results.csv').read_text()  # the config's own value


def test_a_sweep_finds_shipped_configs_without_a_checkout(tmp_path, monkeypatch):
  """An installed package has no repository root: `configs/<file>.py` in a sweep file is the
  shipped config, as for the trainer."""
  from sift_jax import sweep

  monkeypatch.setattr(sweep, 'REPO', str(tmp_path / 'no_checkout'))
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'sweep.py').write_text(
    "def get_sweep():\n  return {'config': 'configs/mlp_fashion_mnist.py:local'}\n"
  )
  run = sweep.make_runs(str(tmp_path / 'sweep.py'))[0]
  shipped = config_lib.resolve_config_path('configs/mlp_fashion_mnist.py')
  assert run.config_arg == f'{os.path.abspath(shipped)}:local'
  (tmp_path / 'sweep.py').write_text("def get_sweep():\n  return {'config': 'configs/nope.py'}\n")
  with pytest.raises(FileNotFoundError, match="config file 'configs/nope.py' does not exist"):
    sweep.make_runs(str(tmp_path / 'sweep.py'))
