"""Bad inputs refused before any work, each in one line (issue 24 items 6, 7 and 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sift_jax import config_lib, validation
from sift_jax.analysis import report
from sift_jax.data import build_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = 'configs/mlp_fashion_mnist.py'


def run_module(module: str, *args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=cwd,
    env={**os.environ, 'PYTHONPATH': REPO},
    capture_output=True,
    text=True,
    timeout=600,
  )


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, out.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


def digits_config(**overrides) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.load_config(MLP, 'local')
  c.data.name = 'digits'
  for key, value in overrides.items():
    group, name = key.split('.') if '.' in key else (None, key)
    (c[group] if group else c)[name] = value
  return c


# ------------------------------------------------------------------ item 6: checked before work


def test_a_batch_larger_than_the_train_split_names_both_numbers():
  with pytest.raises(
    config_lib.ConfigError, match=r'batch_size=5000 .* train split \(1500 examples\)'
  ):
    build_dataset(digits_config(batch_size=5000))


def test_an_eval_batch_larger_than_the_eval_split_names_both_numbers():
  with pytest.raises(config_lib.ConfigError, match=r'eval.batch_size.*=400 .* eval split \(297 '):
    build_dataset(digits_config(**{'batch_size': 16, 'eval.batch_size': 400}))


def test_a_text_batch_counts_windows(tmp_path):
  (tmp_path / 'train.txt').write_bytes(bytes(range(40)))  # 40 tokens: 32 windows of 8 + 1
  c = digits_config(batch_size=40)
  c.data.name, c.data.seq_len = 'text_files', 8
  c.data.train_files = c.data.eval_files = str(tmp_path / 'train.txt')
  with pytest.raises(config_lib.ConfigError, match=r'batch_size=40 .* train split \(32 windows\)'):
    build_dataset(c)


@pytest.mark.parametrize('smoothing', [1.0, 1.5, -0.1])
def test_label_smoothing_outside_0_1_is_refused(smoothing):
  with pytest.raises(
    config_lib.ConfigError, match=rf'optim.label_smoothing={smoothing} .*\[0, 1\)'
  ):
    validation.validate(digits_config(**{'optim.label_smoothing': smoothing}))
  validation.validate(digits_config(**{'optim.label_smoothing': 0.1}))


def block_config(block: tuple[int, int]):
  c = config_lib.load_config(MLP, 'local,sift=wide,sparsity=0.75,rule=rigl')
  c.sparsity.execution = 'block_sparse'
  c.sparsity.block_shape = block
  return c


def test_unit_blocks_under_block_sparse_execution_are_refused_saying_what_is_allowed():
  # Sparse Wide at 0.75: kernels (784, 2048) and (2048, 2048); (1, 1) keeps 196 and 512 per column.
  with pytest.raises(config_lib.ConfigError) as e:
    validation.validate(block_config((1, 1)), {'num_classes': 10, 'image_shape': (28, 28, 1)})
  message = str(e.value)
  assert 'block_shape=(1, 1)' in message and 'hidden_1/kernel (2048, 2048): K=512' in message
  assert f'allowed K <= {validation.MAX_BLOCKS_PER_COLUMN}' in message
  # The block_sparsity study's blocks (16 rows: K = 12 and 32) pass.
  validation.validate(block_config((16, 64)), {'num_classes': 10, 'image_shape': (28, 28, 1)})


def test_unknown_names_suggest_the_closest():
  c = digits_config()
  c.sparsity.rule = 'rigll'
  with pytest.raises(config_lib.ConfigError, match="sparsity.rule='rigll' .*did you mean 'rigl'"):
    validation.validate(c)


# ------------------------------------------------------------------ item 7: sweeps check first

SWEEP = """
def get_sweep():
  return {{
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {{'data.name': 'digits', 'model.hidden': (8,), 'total_steps': 2, 'batch_size': 16}},
    'overrides': {overrides},
  }}
"""
GOOD = [{'sparsity': 0.5}, {'sparsity': 0.5, 'rule': 'static'}, {'seed': 1}]
BAD = [*GOOD, {'optim.lrr': 0.1}, {'rule': 'rigll', 'sparsity': 0.5}]


def write_sweep(folder, overrides) -> str:
  path = os.path.join(folder, 'sweep.py')
  with open(path, 'w') as f:
    f.write(SWEEP.format(overrides=overrides))
  return path


@pytest.mark.parametrize(
  'flag', ['--dry_run', pytest.param('--print_commands', marks=pytest.mark.slow), None]
)
def test_a_sweep_reports_every_bad_run_by_name_before_anything_trains(tmp_path, flag):
  out = run_module('sift_jax.sweep', write_sweep(tmp_path, BAD), *([flag] if flag else []))
  error = assert_one_line_error(
    out,
    'run optim.lrr-0.1: unknown config key --config.optim.lrr',
    'did you mean --config.optim.lr?',
    "run rule-rigll_sparsity-0.5: sparsity.rule='rigll' is unknown",
    "did you mean 'rigl'?",
  )
  assert 'run sparsity-0.5' not in error and 'seed-1' not in error  # the good runs are not named
  assert not os.path.exists(tmp_path / 'runs')  # nothing trained, no folder made


def test_runs_that_resolve_to_the_same_config_are_listed_and_trained_once(tmp_path):
  out = run_module('sift_jax.sweep', write_sweep(tmp_path, GOOD), '--print_commands')
  assert out.returncode == 0, out.stderr[-3000:]
  assert (
    'note: run sparsity-0.5_rule-static resolves to the config of run sparsity-0.5' in out.stderr
  )
  commands = out.stdout.splitlines()
  assert len(commands) == 2 and not any('rule-static' in c for c in commands), commands


# ------------------------------------------------------------------ item 8: one line, exit 2


@pytest.mark.parametrize(
  'arg,needle',
  [
    ('sparsity=abc', "sparsity='abc' is not a number"),
    pytest.param('seed=abc', "seed='abc'", marks=pytest.mark.slow),  # the same parse, one process
  ],
)
def test_a_bad_config_argument_value_is_one_line(tmp_path, arg, needle):
  out = run_module('sift_jax.main', f'--config={MLP}:local,{arg}', cwd=str(tmp_path))
  assert_one_line_error(out, needle)


def test_a_sweep_file_with_a_syntax_error_is_one_line(tmp_path):
  path = tmp_path / 'sweep.py'
  path.write_text("def get_sweep():\n  return {'config': 'configs/mlp_fashion_mnist.py'\n")
  out = run_module('sift_jax.sweep', str(path), '--dry_run')
  assert_one_line_error(out, f'sweep file {path} has a syntax error at line 2')


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text('def get_config(arg=None):\n  return (\n')
  out = run_module('sift_jax.main', f'--config={path}', cwd=str(tmp_path))
  assert_one_line_error(out, f'config file {path} has a syntax error at line')


@pytest.mark.parametrize(
  'name', [pytest.param('summary.json', marks=pytest.mark.slow), 'config.json']
)
def test_the_report_on_a_truncated_run_file_names_the_file(tmp_path, name):
  run = tmp_path / 'study' / 'runs' / 'a'
  run.mkdir(parents=True)
  config = json.loads(digits_config().to_json())
  (run / 'config.json').write_text(json.dumps(config))
  (run / 'summary.json').write_text(json.dumps({'eval/loss': 1.0, 'eval/accuracy': 0.5}))
  (run / name).write_text((run / name).read_text()[:20])  # a write cut short
  with pytest.raises(ValueError, match=f'{run / name} is not valid JSON'):
    report.read_run(str(run))
  out = run_module('sift_jax.analysis.report', str(tmp_path / 'study'))
  assert_one_line_error(out, str(run / name), 'is not valid JSON')
