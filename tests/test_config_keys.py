"""`python -m sift_jax.config_keys`: every key with its value and the meaning from base_config."""

from __future__ import annotations

import os
import subprocess
import sys

from sift_jax import config_keys, config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_base_config_key_has_a_meaning():
  """A key added to base_config without a comment fails here: the listing has no blank lines."""
  meaning = config_keys.descriptions()
  keys = config_lib.flat_keys(config_lib.base_config())
  assert [k for k in keys if not meaning.get(k)] == []
  groups = {k.rsplit('.', 1)[0] for k in keys if '.' in k}
  assert set(meaning) <= set(keys) | groups  # no meaning of a key that does not exist
  assert meaning['sparsity.update_every_steps'] == 'dT'
  assert meaning['data.workers'].startswith('Images: training batches built in this many grain')


def test_rows_follow_the_config_and_name_model_keys():
  config = config_lib.load_config('configs/gpt_small_wide.py', 'smoke')
  rows = {k: (v, m) for k, v, m in config_keys.rows(config)}
  assert set(rows) == set(config_lib.flat_keys(config))
  assert rows['total_steps'][0] == config_lib.SMOKE_STEPS
  assert rows['sift.name'] == ('wide', config_keys.descriptions()['sift.name'])
  assert rows['model.d_model'] == (128, "a key of model 'gpt' (sift_jax/models: register_model)")


def test_the_command_lists_a_configs_keys_and_refuses_a_bad_one(tmp_path):
  def run(*args):
    return subprocess.run(
      [sys.executable, '-m', 'sift_jax.config_keys', *args],
      cwd=tmp_path,
      env={**os.environ, 'PYTHONPATH': REPO},
      capture_output=True,
      text=True,
      timeout=300,
    )

  out = run('--config=configs/mlp_fashion_mnist.py:local,rule=rigl', '--config.optim.lr=0.5')
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert len(lines) == len(
    config_lib.flat_keys(config_lib.load_config('configs/mlp_fashion_mnist.py'))
  )
  assert any(
    line.startswith("sparsity.rule = 'rigl'") and '# dense | static' in line for line in lines
  )
  assert any(line.startswith('optim.lr = 0.5 ') for line in lines)
  bad = run('--config=configs/mlp_fashion_mnist.py', '--config.optim.lrr=1')
  assert bad.returncode == 2 and 'did you mean --config.optim.lr' in bad.stderr
