"""End-to-end runs of the trainer on embedded data: outputs, resume, refusals, bad input."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sift_jax import config_lib, errors, health, steps, train

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
  with pytest.raises(health.NonFiniteLossError, match=r'step \d+: train/loss='):
    train.train_and_evaluate(c, str(tmp_path))
  # Checkpoint 1 holds the weights whose loss is NaN: set aside, not left as the latest.
  assert os.listdir(tmp_path / 'checkpoints') == []
  assert os.listdir(tmp_path / 'checkpoints_diverged') == ['1']


@pytest.mark.parametrize(
  'override, message',
  [
    ({'total_steps': -5}, 'total_steps=-5'),
    ({'batch_size': 0}, 'batch_size=0'),
    ({'model.name': 'transformer'}, "model.name='transformer' is unknown"),
    ({'data.name': 'mnist'}, "data.name='mnist' is unknown"),
    ({'optim.name': 'lion'}, "optim.name='lion' is unknown"),
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


@pytest.mark.parametrize(
  'key, value',
  [
    ('model.name', 'mlpp'),
    ('sparsity.rule', 'rigll'),
    ('sift.name', 'wid'),
    ('sparsity.distribution', 'erk2'),
  ],
)
def test_a_misspelt_name_is_refused_before_data_loads_and_leaves_no_folder(
  tmp_path, monkeypatch, key, value
):
  from sift_jax import data

  def no_data(*args, **kwargs):
    raise AssertionError('the data was loaded before the names were checked')

  monkeypatch.setattr(data, 'build_dataset', no_data)
  c = tiny_config()
  group, leaf = key.split('.')
  c[group][leaf] = value
  workdir = tmp_path / 'runs' / 'new'
  with pytest.raises(config_lib.ConfigError, match=f"{key}='{value}' is unknown; known: "):
    train.train_and_evaluate(c, str(workdir))
  assert not (tmp_path / 'runs').exists()


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
  assert "error: data.name='mnist' is unknown; known:" in out.stderr
  assert 'Traceback' not in out.stderr


@pytest.mark.slow  # default run: test_scale.py's fsdp test (8 devices against one, same losses)
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


@pytest.mark.slow  # default run: test_scale.py's SIGKILL during a save, then the rerun
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


def start_mlp_run(workdir, *flags: str, cwd=REPO) -> subprocess.Popen:
  """`sift_jax.main` on the small digits MLP in the background, output captured; workdir None:
  main's own default, a new runs/<name>_<time> under `cwd`."""
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'sift_jax.main',
      f'--config={REPO}/configs/mlp_fashion_mnist.py:local',
      '--config.data.name=digits',
      '--config.model.hidden=(32,)',
      *flags,
      *([f'--workdir={workdir}'] if workdir else []),
    ],
    cwd=cwd,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_sigterm_saves_at_the_next_step_and_exits_zero(tmp_path):
  proc = start_mlp_run(
    tmp_path,
    '--config.total_steps=100000',
    '--config.checkpoint_every_steps=100000',
    '--config.log_every_steps=10',
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


def test_after_sigterm_the_hint_names_the_workdir_the_run_was_given(tmp_path):
  # No --workdir: "rerun the same command" would start a new runs/<name>_<time> folder.
  proc = start_mlp_run(
    None,
    '--config.total_steps=100000',
    '--config.checkpoint_every_steps=100000',
    '--config.log_every_steps=10',
    cwd=tmp_path,
  )
  deadline = time.time() + 300
  while time.time() < deadline and not list(tmp_path.glob('runs/*/metrics.jsonl')):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  (run,) = tmp_path.glob('runs/*')
  assert f'rerun with --workdir={run} to resume' in out
  assert (run / 'config.json').exists() and list((run / 'checkpoints').iterdir())


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


# --------------------------------------------------------------------------- reliability


def summary_of(workdir) -> dict:
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def test_rerun_of_a_finished_run_keeps_or_rebuilds_its_summary(tmp_path, capsys):
  c = tiny_config()
  train.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / 'summary.json') as f:
    original = f.read()
  capsys.readouterr()
  train.train_and_evaluate(c, str(tmp_path))
  assert 'already finished at step 6; its outputs are left as they are' in capsys.readouterr().out
  with open(tmp_path / 'summary.json') as f:
    assert f.read() == original
  # Killed after the final checkpoint, before summary.json: the rerun rebuilds it whole.
  os.remove(tmp_path / 'summary.json')
  train.train_and_evaluate(c, str(tmp_path))
  assert 'rebuilt it' in capsys.readouterr().out
  rebuilt, before = summary_of(tmp_path), json.loads(original)
  for key in ('train/loss', 'eval/loss', 'eval/accuracy', 'sparsity/density', 'params/global_norm'):
    assert rebuilt[key] == before[key], key
  assert [r['step'] for r in read_jsonl(tmp_path / 'metrics.jsonl')] == [2, 3, 4, 6]


def test_checkpoint_past_total_steps_is_refused(tmp_path):
  c = tiny_config()
  train.train_and_evaluate(c, str(tmp_path))
  c.total_steps = 4
  with pytest.raises(errors.UserError, match=r'holds step 6, past total_steps=4'):
    train.train_and_evaluate(c, str(tmp_path))


def corrupt(folder) -> None:
  """Flips a byte in the largest file a checkpoint's checksums cover."""
  with open(folder / 'sha256.json') as f:
    names = json.load(f)
  name = max(names, key=lambda n: os.path.getsize(folder / n))
  with open(folder / name, 'r+b') as f:
    first = f.read(1)
    f.seek(0)
    f.write(bytes([first[0] ^ 0xFF]))


def test_all_checkpoints_unreadable_is_refused_and_nothing_moves(tmp_path):
  c = tiny_config()
  train.train_and_evaluate(c, str(tmp_path))
  os.remove(tmp_path / 'summary.json')
  for step in ('3', '6'):
    corrupt(tmp_path / 'checkpoints' / step)
  for _ in range(2):  # the second rerun must not start over either
    with pytest.raises(errors.UserError, match=r'no readable checkpoint.*To start over'):
      train.train_and_evaluate(c, str(tmp_path))
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
    assert not os.path.exists(tmp_path / 'checkpoints_corrupt')
  # Checkpoints set aside (by hand or by an older version): still no silent restart.
  os.rename(tmp_path / 'checkpoints', tmp_path / 'checkpoints_corrupt')
  with pytest.raises(errors.UserError, match=r'refusing to start over from step 0'):
    train.train_and_evaluate(c, str(tmp_path))


def test_a_corrupt_newest_checkpoint_falls_back_and_is_moved_aside(tmp_path):
  c = tiny_config()
  train.train_and_evaluate(c, str(tmp_path))
  os.remove(tmp_path / 'summary.json')
  corrupt(tmp_path / 'checkpoints' / '6')
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary['resumed_from_step'] == 3
  assert os.listdir(tmp_path / 'checkpoints_corrupt') == ['6']


def test_divergence_without_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  c = tiny_config()
  c.optim.lr = 5.0  # loss 2.6, 19, 364: finite, exploding from step 3
  c.total_steps = 12
  c.log_every_steps = c.checkpoint_every_steps = 1
  c.checkpoint.keep = 1
  with pytest.raises(
    health.NonFiniteLossError, match=r'step 3: train/loss=36\d.* divergence limit'
  ):
    train.train_and_evaluate(c, str(tmp_path))
  # Checkpoint 2 was saved with the weights that gave loss 364: set aside, 1 kept despite keep=1.
  assert os.listdir(tmp_path / 'checkpoints') == ['1']
  assert os.listdir(tmp_path / 'checkpoints_diverged') == ['2']
  result = train.train_and_evaluate(c, str(tmp_path), mode='eval')
  assert result['step'] == 1 and np.isfinite(result['eval/loss'])
  assert [r['step'] for r in read_jsonl(tmp_path / 'metrics.jsonl')] == [1, 2]


def test_eval_of_a_non_finite_state_fails(tmp_path, monkeypatch):
  c = tiny_config()
  train.train_and_evaluate(c, str(tmp_path))
  monkeypatch.setattr(
    steps, 'evaluate', lambda *a: {'eval/loss': float('nan'), 'eval/accuracy': 0.1}
  )
  with pytest.raises(health.NonFiniteLossError, match=r'eval/loss=nan at step 6'):
    train.train_and_evaluate(c, str(tmp_path), mode='eval')


def test_a_checkpoint_of_another_shape_is_a_config_error(tmp_path):
  c = tiny_config()
  train.train_and_evaluate(c, str(tmp_path))
  os.remove(tmp_path / 'config.json')
  os.remove(tmp_path / 'summary.json')
  c.model.hidden = (33,)
  with pytest.raises(errors.UserError) as info:
    train.train_and_evaluate(c, str(tmp_path))
  message = str(info.value)
  assert 'params/hidden_0/kernel: checkpoint (64, 32) float32, model (64, 33) float32' in message
  assert 'Traceback' not in message and '\n' not in message
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  assert not os.path.exists(tmp_path / 'checkpoints_corrupt')


def test_resume_keeps_one_row_per_step_and_says_where_it_resumed(tmp_path, capsys):
  c = tiny_config()
  train.train_and_evaluate(c, str(tmp_path))
  # The console hears from the run once its step is compiled, before the first log step.
  assert re.search(
    r'compiled the train step in \d+\.\d s; step 1 took \d+\.\d\d s\n', capsys.readouterr().out
  )
  first = read_jsonl(tmp_path / 'metrics.jsonl')
  # As after a kill between checkpoints 3 and 6: steps 4..6 are replayed.
  shutil.rmtree(tmp_path / 'checkpoints' / '6')
  os.remove(tmp_path / 'summary.json')
  train.train_and_evaluate(c, str(tmp_path))
  out = capsys.readouterr().out
  assert 'resumed from step 3 of 6' in out and '; step 4 took ' in out
  rows = read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [2, 3, 4, 6]
  assert [r['train/loss'] for r in rows] == [r['train/loss'] for r in first]


def test_extending_a_run_says_that_its_schedules_change(tmp_path, capsys):
  c = tiny_config()
  train.train_and_evaluate(c, str(tmp_path))
  assert 'total_steps changed' not in capsys.readouterr().out
  c.total_steps = 9
  train.train_and_evaluate(c, str(tmp_path))
  out = capsys.readouterr().out
  assert 'resumed from step 6 of 9' in out
  assert 'total_steps changed from 6 to 9: the learning-rate and sparsity schedules' in out
  os.remove(tmp_path / 'summary.json')
  shutil.rmtree(tmp_path / 'checkpoints' / '9')
  train.train_and_evaluate(c, str(tmp_path))
  assert 'total_steps changed' not in capsys.readouterr().out  # config.json already says 9


def test_progress_prints_eval_results_and_eval_mode_prints_its_result(tmp_path, capsys):
  c = tiny_config()
  c.progress = True
  train.train_and_evaluate(c, str(tmp_path))
  lines = capsys.readouterr().out.splitlines()
  evals = [line for line in lines if ' eval ' in line]
  assert [line.split()[1] for line in evals] == ['3/6', '6/6'], lines
  assert 'accuracy' in evals[0] and 'loss' in evals[0]
  result = train.train_and_evaluate(c, str(tmp_path), mode='eval')
  out = capsys.readouterr().out
  assert f'eval at step 6: accuracy {result["eval/accuracy"]:.4g}' in out
  with open(tmp_path / 'eval.json') as f:
    assert json.load(f) == result
  assert [r['step'] for r in read_jsonl(tmp_path / 'metrics.jsonl')] == [2, 3, 4, 6]


def test_a_workdir_that_is_a_file_is_one_clear_error(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(errors.WorkdirError, match=rf'--workdir={path} is a file, not a folder'):
    train.train_and_evaluate(tiny_config(), str(path))


@pytest.mark.parametrize(
  'where, code, message',
  [
    ('config', errno.EROFS, 'the file system is read-only. Make it writable'),
    ('config', errno.EACCES, 'it is not writable. Make it writable'),
    ('metrics', errno.ENOSPC, 'the disk is full. Free space on it'),
    ('checkpoint', errno.ENOSPC, 'the disk is full. Free space on it'),
  ],
)
def test_unwritable_workdir_and_full_disk_are_one_clear_error(
  tmp_path, monkeypatch, where, code, message
):
  from sift_jax import checkpointing
  from sift_jax import metrics as metrics_lib

  def fail(path, *args, **kwargs):
    raise OSError(code, os.strerror(code), str(path))

  if where == 'config':
    monkeypatch.setattr(metrics_lib, 'write_json', fail)
  elif where == 'metrics':
    monkeypatch.setattr(metrics_lib.MetricWriter, 'write', lambda self, step, row: fail(tmp_path))
  else:  # inside orbax's save, on its background thread
    monkeypatch.setattr(checkpointing, '_write_json_atomic', fail)
  with pytest.raises(errors.WorkdirError) as info:
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert f'cannot write {tmp_path}' in str(info.value)
  # The same errno on a file outside the workdir (a dataset, say) is not a workdir problem.
  assert errors.workdir_error(OSError(code, 'x', '/elsewhere/data.gz'), str(tmp_path)) is None
  assert message in str(info.value)
  assert 'rerunning the same command resumes' in str(info.value)


@pytest.mark.slow  # SIGTERM mid-run stays in the default run (test_sigterm_saves_at_the_next_step)
def test_sigterm_after_the_final_checkpoint_finishes_the_run_and_exits_zero(tmp_path):
  total = 40
  proc = start_mlp_run(
    tmp_path,
    f'--config.total_steps={total}',
    f'--config.checkpoint_every_steps={total}',
    '--config.eval.max_examples=64',
  )
  ckpts = tmp_path / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (ckpts / str(total)).exists():  # renamed into place: the save is complete
      break
    time.sleep(0.002)
  assert proc.poll() is None, 'the run ended before the final save could be interrupted'
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert summary_of(tmp_path)['eval/accuracy'] > 0
  assert os.listdir(ckpts) == [str(total)]


@pytest.mark.slow  # the full-disk message itself: test_unwritable_workdir_and_full_disk_...
def test_a_full_disk_during_a_save_is_one_line_on_the_console(tmp_path):
  script = f"""
import errno, os
from sift_jax import checkpointing, main

def full(path, *args):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

checkpointing._write_json_atomic = full  # runs inside orbax's save, on its thread
main.run(['main', '--config={REPO}/configs/mlp_fashion_mnist.py:local',
          '--config.data.name=digits', '--config.total_steps=4',
          '--config.checkpoint_every_steps=2', '--workdir={tmp_path}'])
"""
  out = subprocess.run(
    [sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 2, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if not line.startswith(('I0000', 'W0000'))]
  assert len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith(f'error: cannot write {tmp_path}/checkpoints/2.orbax-checkpoint-tmp')
  assert 'the disk is full' in lines[0]


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_file(monkeypatch):
  from sift_jax import metrics as metrics_lib

  class Terminal(io.StringIO):
    def isatty(self) -> bool:
      return True

  row = {'train/loss': 2.5, 'train/lr': 0.1, 'train/examples_per_s': 100.0}
  outputs = {}
  for name, stream in (('file', io.StringIO()), ('terminal', Terminal())):
    monkeypatch.setattr(sys, 'stdout', stream)
    with metrics_lib.Progress(10, 0, 'examples') as progress:
      progress.update(5, row)
      progress.update(10, {**row, 'eval/loss': 1.25, 'eval/accuracy': 0.5})
    outputs[name] = stream.getvalue()
  lines = outputs['file'].splitlines()
  assert '\r' not in outputs['file'] and len(lines) == 2
  assert lines[0].startswith('step 5/10  loss 2.5000  100 examples/s  lr 0.1  ETA ')
  assert 'eval accuracy 0.5  loss 1.25' in lines[1]
  assert '\r' in outputs['terminal'] and '10/10' in outputs['terminal']  # a tqdm bar
  assert 'step 10/10  eval accuracy 0.5  loss 1.25\n' in outputs['terminal']
