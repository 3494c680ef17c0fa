"""End-to-end runs of the trainer on embedded data: outputs, resume, refusals, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sift_jax import config_lib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(family: str = 'mlp', arg: str = 'local'):
  """A run of a few seconds on embedded data for each trainer path."""
  path = {
    'mlp': 'configs/mlp_fashion_mnist.py',
    'gpt': 'configs/gpt_small_dense.py',
    'resnet': 'configs/resnet18_cifar100.py',
  }[family]
  c = config_lib.load_config(os.path.join(REPO, path), arg)
  c.total_steps = 6
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.progress = False
  c.optim.schedule = 'constant'
  c.optim.warmup_steps = 0
  c.optim.warmup_fraction = 0.0
  c.eval.max_examples = 64
  c.batch_size = 16
  if family == 'gpt':
    c.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64, context_length=32)
  else:
    c.data.name = 'digits'
    if family == 'resnet':
      c.model.width = 4
    else:
      c.model.hidden = (32,)
  return c


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def final_params(workdir: str) -> dict:
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  path = os.path.join(workdir, 'checkpoints', str(steps[-1]), 'state')
  return ocp.StandardCheckpointer().restore(path)['params']


def assert_trees_equal(a, b) -> None:
  import jax

  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('family', ['mlp', 'gpt', 'resnet'])
def test_run_writes_the_outputs_of_design_md(tmp_path, family):
  c = tiny_config(family)
  summary = train.train_and_evaluate(c, str(tmp_path))
  for name in ('config.json', 'metrics.jsonl', 'summary.json'):
    assert os.path.exists(tmp_path / name), name
  assert os.listdir(tmp_path / 'tensorboard')
  rows = read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [2, 3, 4, 6]
  for r in rows:
    for key in (
      'train/loss',
      'train/lr',
      'train/grad_norm',
      'train/examples_per_s',
      'train/step_time_s',
      'sparsity/density',
      'flops/train_per_example',
    ):
      assert key in r, (key, r)
  assert 'eval/loss' in rows[1] and 'eval/loss' in rows[-1]
  assert ('eval/perplexity' in rows[-1]) == (family == 'gpt')
  assert ('train/tokens_per_s' in rows[0]) == (family == 'gpt')
  with open(tmp_path / 'summary.json') as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(summary))
  for key in (
    'params/total',
    'params/sparse',
    'params/active',
    'params/global_norm',
    'flops/forward_per_example',
    'flops/forward_per_example_dense',
    'flops/train_per_example',
    'resumed_from_step',
    'wall_time_s',
    'device_kind',
    'device_count',
    'process_count',
    'git_sha',
    'git_dirty',
    'command_line',
    'sparsity/layer_density',
    'eval/loss',
  ):
    assert key in saved, key
  assert saved['resumed_from_step'] == 0
  assert saved['params/active'] == saved['params/total']  # dense
  assert saved['flops/forward_per_example'] == saved['flops/forward_per_example_dense']
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']


def test_resume_is_exact(tmp_path):
  straight = tiny_config()
  train.train_and_evaluate(straight, str(tmp_path / 'straight'))
  half = tiny_config()
  half.total_steps = 3
  train.train_and_evaluate(half, str(tmp_path / 'resumed'))
  summary = train.train_and_evaluate(tiny_config(), str(tmp_path / 'resumed'))
  assert summary['resumed_from_step'] == 3
  assert_trees_equal(final_params(tmp_path / 'straight'), final_params(tmp_path / 'resumed'))
  losses = [r['train/loss'] for r in read_jsonl(tmp_path / 'straight' / 'metrics.jsonl')]
  resumed = [r['train/loss'] for r in read_jsonl(tmp_path / 'resumed' / 'metrics.jsonl')]
  assert resumed[-1] == losses[-1]


def test_rerun_with_a_different_config_is_refused(tmp_path):
  c = tiny_config()
  c.total_steps = 3
  train.train_and_evaluate(c, str(tmp_path))
  c.optim.lr = 0.5
  with pytest.raises(ValueError, match=r'optim\.lr: 0\.05 -> 0\.5'):
    train.train_and_evaluate(c, str(tmp_path))


def test_eval_mode_restores_the_latest_checkpoint(tmp_path):
  c = tiny_config()
  summary = train.train_and_evaluate(c, str(tmp_path))
  result = train.train_and_evaluate(c, str(tmp_path), mode='eval')
  assert result['eval/loss'] == pytest.approx(summary['eval/loss'], rel=1e-6)
  with pytest.raises(FileNotFoundError, match='needs a checkpoint'):
    train.train_and_evaluate(c, str(tmp_path / 'empty'), mode='eval')


def test_non_finite_loss_stops_before_saving(tmp_path):
  c = tiny_config()
  c.checkpoint_every_steps = 1
  c.optim.lr = 1e30  # step 1 is finite, its update blows the weights up
  with pytest.raises(train.NonFiniteLossError, match=r'step \d+: train/loss='):
    train.train_and_evaluate(c, str(tmp_path))
  saved = sorted(os.listdir(tmp_path / 'checkpoints'))
  assert saved and len(saved) < c.total_steps
  import jax

  for leaf in jax.tree.leaves(final_params(tmp_path)):
    assert np.isfinite(leaf).all()


@pytest.mark.parametrize(
  'override, message',
  [
    ({'total_steps': -5}, 'total_steps=-5'),
    ({'batch_size': 0}, 'batch_size=0'),
    ({'model.name': 'transformer'}, "unknown model 'transformer'"),
    ({'data.name': 'mnist'}, "unknown dataset 'mnist'"),
    ({'optim.name': 'lion'}, "unknown optimizer 'lion'"),
    ({'optim.grad_accum_steps': 3}, 'grad_accum_steps=3'),
    ({'optim.schedule': 'linear'}, "unknown optim.schedule 'linear'"),
  ],
)
def test_bad_config_values_name_the_value(tmp_path, override, message):
  c = tiny_config()
  for key, value in override.items():
    group, _, leaf = key.rpartition('.')
    (c[group] if group else c)[leaf] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints' / '3')


def test_grad_accumulation_matches_the_full_batch(tmp_path):
  full = tiny_config()
  full.total_steps = 2
  train.train_and_evaluate(full, str(tmp_path / 'full'))
  accum = tiny_config()
  accum.total_steps = 2
  accum.optim.grad_accum_steps = 4
  train.train_and_evaluate(accum, str(tmp_path / 'accum'))
  import jax

  for x, y in zip(
    jax.tree.leaves(final_params(tmp_path / 'full')),
    jax.tree.leaves(final_params(tmp_path / 'accum')),
    strict=True,
  ):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def run_main(args: list[str], cwd: str, env_extra: dict | None = None):
  env = {**os.environ, **(env_extra or {})}
  return subprocess.run(
    [sys.executable, '-m', 'sift_jax.main', *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_main_reports_bad_input_in_one_line_and_exits_non_zero(tmp_path):
  out = run_main(
    [
      f'--config={REPO}/configs/mlp_fashion_mnist.py:local',
      '--config.data.name=mnist',
      f'--workdir={tmp_path}',
    ],
    cwd=REPO,
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "error: unknown dataset 'mnist'; known:" in out.stderr
  assert 'Traceback' not in out.stderr


def test_same_losses_on_one_and_eight_devices(tmp_path):
  script = f"""
import json, sys
sys.path.insert(0, {REPO!r})
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
from test_train import tiny_config
from sift_jax import train
c = tiny_config('gpt')
c.batch_size = 16
train.train_and_evaluate(c, sys.argv[1])
"""
  losses = {}
  for n in (1, 8):
    workdir = str(tmp_path / f'dev{n}')
    env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
    out = subprocess.run(
      [sys.executable, '-c', script, workdir], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    with open(os.path.join(workdir, 'summary.json')) as f:
      assert json.load(f)['device_count'] == n
    losses[n] = [r['train/loss'] for r in rows] + [rows[-1]['eval/loss']]
  np.testing.assert_allclose(losses[1], losses[8], rtol=2e-5)


def test_sigkill_after_a_checkpoint_then_rerun_equals_an_uninterrupted_run(tmp_path):
  flags = [
    f'--config={REPO}/configs/mlp_fashion_mnist.py:local',
    '--config.data.name=digits',
    '--config.model.hidden=(32,)',
    '--config.total_steps=400',
    '--config.checkpoint_every_steps=100',
    '--config.eval.max_examples=64',
  ]
  straight = run_main([*flags, f'--workdir={tmp_path / "straight"}'], cwd=REPO)
  assert straight.returncode == 0, straight.stderr[-2000:]

  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(
    [sys.executable, '-m', 'sift_jax.main', *flags, f'--workdir={workdir}'],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpts = workdir / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and not (
    ckpts.exists() and any(p.isdigit() for p in os.listdir(ckpts))
  ):
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  assert ckpts.exists(), 'no checkpoint appeared before the deadline'
  resumed = run_main([*flags, f'--workdir={workdir}'], cwd=REPO)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert 0 < summary['resumed_from_step'] < 400
  assert_trees_equal(final_params(tmp_path / 'straight'), final_params(workdir))


def test_sigterm_saves_at_the_next_step_and_exits_zero(tmp_path):
  flags = [
    f'--config={REPO}/configs/mlp_fashion_mnist.py:local',
    '--config.data.name=digits',
    '--config.model.hidden=(32,)',
    '--config.total_steps=100000',
    '--config.checkpoint_every_steps=100000',
    '--config.log_every_steps=10',
    f'--workdir={tmp_path}',
  ]
  proc = subprocess.Popen(
    [sys.executable, '-m', 'sift_jax.main', *flags],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  metrics_file = tmp_path / 'metrics.jsonl'
  while time.time() < deadline and not (metrics_file.exists() and metrics_file.stat().st_size):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert 'SIGTERM received: saved a checkpoint at step' in out
  saved = [int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()]
  assert len(saved) == 1 and saved[0] >= 10


@pytest.mark.parametrize('rule', ['rigl', 'gse', 'topkast'])
def test_sparse_run_keeps_exact_density_and_exports_csr(tmp_path, rule):
  from sift_jax.sparsity.export import export_checkpoint, load_sparse

  c = tiny_config('mlp', f'local,rule={rule},sparsity=0.9')
  c.model.hidden = (31, 17)  # odd sizes: round(0.1 * 64 * 31) = 198, round(0.1 * 31 * 17) = 53
  c.sparsity.update_every_steps = 2
  c.sparsity.topkast_every_steps = 2
  c.sparsity.end_fraction = 1.0
  summary = train.train_and_evaluate(c, str(tmp_path))
  rows = read_jsonl(tmp_path / 'metrics.jsonl')
  for r in rows:
    assert r['sparsity/density/hidden_0/kernel'] == pytest.approx(198 / (64 * 31), abs=1e-7)
    assert r['sparsity/density/hidden_1/kernel'] == pytest.approx(53 / (31 * 17), abs=1e-7)
  assert rows[-1]['sparsity/churn'] > 0
  assert summary['params/sparse'] == 64 * 31 + 31 * 17
  index = export_checkpoint(str(tmp_path), str(tmp_path / 'export'))
  assert {k: v['nnz'] for k, v in index.items()} == {'hidden_0/kernel': 198, 'hidden_1/kernel': 53}
  dense = load_sparse(str(tmp_path / 'export'))
  assert (dense['hidden_0/kernel'] != 0).sum() <= 198
