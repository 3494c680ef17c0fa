"""Tests of config loading: shipped configs from any directory, bad files and keys, saved configs."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from sift_jax import config_lib, optim, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(f for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py'))


def run_module(module: str, args: list[str], cwd: str) -> subprocess.CompletedProcess:
  """`python -m module args` from `cwd`, with this checkout first on the path."""
  env = {**os.environ, 'PYTHONPATH': REPO}
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize('name', SHIPPED)
def test_every_shipped_config_loads_from_another_directory(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = config_lib.load_config(f'configs/{name}', 'local' if 'imagenet' not in name else None)
  assert c.total_steps > 0
  assert (
    config_lib.load_config(name).to_json() == config_lib.load_config(f'configs/{name}').to_json()
  )


def test_built_package_carries_the_configs(tmp_path):
  """What a pip install ships: build_py of the package, then load a config from elsewhere."""
  src = tmp_path / 'src'
  src.mkdir()
  shutil.copy(os.path.join(REPO, 'pyproject.toml'), src)
  shutil.copytree(os.path.join(REPO, 'configs'), src / 'configs')
  ignore = shutil.ignore_patterns('__pycache__')
  shutil.copytree(os.path.join(REPO, 'sift_jax'), src / 'sift_jax', symlinks=True, ignore=ignore)
  build = subprocess.run(
    [sys.executable, '-c', 'import setuptools; setuptools.setup()', '-q', 'build_py'],
    cwd=src,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert build.returncode == 0, build.stderr[-2000:]
  built = src / 'build' / 'lib' / 'sift_jax' / 'configs'
  assert sorted(p.name for p in built.glob('*.py')) == SHIPPED
  assert not built.is_symlink()


def test_readme_command_runs_outside_the_repository(tmp_path):
  out = run_module(
    'sift_jax.model_report', ['--config=configs/gpt_small_wide.py:local'], str(tmp_path)
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'params:' in out.stdout


def test_unknown_config_file_is_one_line(tmp_path):
  out = run_module('sift_jax.main', ['--config=configs/mlp_fashion_mnis.py:local'], str(tmp_path))
  assert_one_line_error(out, "'configs/mlp_fashion_mnis.py'", 'configs/mlp_fashion_mnist.py?')


def test_misspelt_key_suggests_the_close_match(tmp_path):
  out = run_module(
    'sift_jax.main',
    ['--config=configs/mlp_fashion_mnist.py:local', '--config.sparsity.rulee=rigl'],
    str(tmp_path),
  )
  assert_one_line_error(out, '--config.sparsity.rulee', 'did you mean --config.sparsity.rule?')


def test_check_key_names_the_group_and_the_match():
  c = config_lib.base_config()
  config_lib.check_key(c, 'optim.lr')
  with pytest.raises(config_lib.ConfigError, match=r"optim has no 'lrr'.*--config\.optim\.lr\?"):
    config_lib.check_key(c, 'optim.lrr')
  with pytest.raises(config_lib.ConfigError, match="the config has no 'optimm'"):
    config_lib.check_key(c, 'optimm.lr')
  with pytest.raises(config_lib.ConfigError, match="optim.lr has no 'x'"):
    config_lib.check_key(c, 'optim.lr.x')


def test_saved_config_round_trips_with_tuples(tmp_path):
  c = config_lib.load_config('configs/mlp_fashion_mnist.py', 'local')
  (tmp_path / 'config.json').write_text(c.to_json())
  saved = config_lib.load_saved_config(str(tmp_path))
  assert saved.to_json() == c.to_json()
  assert saved.model.hidden == (1024, 1024)
  with pytest.raises(config_lib.ConfigError, match='config.json does not exist'):
    config_lib.load_saved_config(str(tmp_path / 'none'))


def tiny_run_config():
  c = config_lib.load_config('configs/mlp_fashion_mnist.py', 'local')
  c.update(total_steps=4, log_every_steps=2, eval_every_steps=4, checkpoint_every_steps=4)
  c.progress = False
  c.data.name = 'digits'
  c.model.hidden = (16,)
  c.batch_size = 16
  return c


@pytest.mark.slow  # the same flow, default run: tests/test_plugins.py (with --import)
def test_eval_and_resume_with_only_the_workdir(tmp_path):
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(tiny_run_config(), workdir)
  out = run_module('sift_jax.main', ['--mode=eval', f'--workdir={workdir}'], str(tmp_path))
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = json.loads(f.readlines()[-1])
  assert last['step'] == 4
  assert last['eval/accuracy'] == pytest.approx(summary['eval/accuracy'])
  out = run_module(
    'sift_jax.main', [f'--workdir={workdir}', '--config.total_steps=6'], str(tmp_path)
  )
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['resumed_from_step'] == 4
  # A changed experiment key is still refused, in one line.
  out = run_module('sift_jax.main', [f'--workdir={workdir}', '--config.optim.lr=6'], str(tmp_path))
  assert_one_line_error(out, 'optim.lr: 0.05 -> 6.0')


def test_missing_config_and_workdir_is_one_line(tmp_path):
  out = run_module('sift_jax.main', [f'--workdir={tmp_path}', '--mode=eval'], str(tmp_path))
  assert_one_line_error(out, 'config.json does not exist', '--config=configs/<file>.py')


@pytest.mark.parametrize(
  'name,arg,warmup',
  [
    ('gpt_small_dense.py', None, 2_151),
    ('gpt_small_dense.py', 'local', 100),
    ('gpt_small_wide.py', 'local', 100),
    ('resnet18_cifar100.py', None, 0),
    ('resnet18_cifar100.py', 'local', 20),
    ('resnet18_imagenet.py', None, 5 * 5_005),
    ('resnet34_imagenet.py', 'local', 20),
    ('mlp_fashion_mnist.py', 'local', 0),
  ],
)
def test_configs_keep_their_warmup_steps(name, arg, warmup):
  c = config_lib.load_config(f'configs/{name}', arg)
  assert optim.warmup_steps(c.optim, c.total_steps) == warmup


def test_shortening_a_run_shortens_its_warmup():
  c = config_lib.load_config('configs/gpt_small_dense.py', 'local')
  c.total_steps = 30
  _, schedule = optim.make_optimizer(c.optim, c.total_steps)
  assert optim.warmup_steps(c.optim, 30) == 10
  assert float(schedule(5)) == pytest.approx(c.optim.lr / 2)
  assert float(schedule(10)) == pytest.approx(c.optim.lr)
  c.optim.warmup_steps = 50  # explicit steps win over the fraction, and must fit the run
  with pytest.raises(ValueError, match=r'optim.warmup_steps=50 must be in \[0, total_steps=30\]'):
    optim.make_optimizer(c.optim, c.total_steps)
  c.optim.warmup_steps = 4
  assert optim.warmup_steps(c.optim, 30) == 4
  c.optim.warmup_fraction = 1.5
  with pytest.raises(ValueError, match='optim.warmup_fraction=1.5'):
    optim.make_optimizer(c.optim, c.total_steps)


def test_help_needs_no_config(tmp_path):
  out = run_module('sift_jax.main', ['--help'], str(tmp_path))
  assert '--workdir' in out.stdout and 'Traceback' not in out.stderr
