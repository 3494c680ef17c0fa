"""Names registered outside sift_jax: --import, a sweep file's 'imports', entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sift_jax import plugins, registry, sweep
from sift_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A user's own rule: static masks under another name, which sift_jax does not know.
EXTENSION = """
from sift_jax.registry import RULES
from sift_jax.sparsity import rules


@RULES.register('{name}')
class Mine(rules.Static):
  pass
"""
TINY = [
  '--config=configs/mlp_fashion_mnist.py:local',
  '--config.sparsity.level=0.5',
  '--config.total_steps=4',
  '--config.log_every_steps=2',
  '--config.checkpoint_every_steps=2',
  '--config.model.hidden=(16,16)',
  '--config.data.name=digits',
  '--config.eval.max_examples=64',
  '--config.batch_size=16',
  '--config.progress=false',
]


def write_module(folder, module: str, rule: str) -> None:
  (folder / f'{module}.py').write_text(EXTENSION.format(name=rule))


def main(*args: str, cwd, extra_path: str = '') -> subprocess.CompletedProcess:
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [REPO, extra_path]))}
  return subprocess.run(
    [sys.executable, '-m', 'sift_jax.main', *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_flag_values_and_record(tmp_path):
  argv = ['main', '--import=a', '--workdir', 'w', '--import', 'b', '--config.x=1']
  assert plugins.flag_values(argv, 'import') == ['a', 'b']
  assert plugins.flag_values(argv, 'workdir') == ['w']
  plugins.record(str(tmp_path / 'run'), [])
  assert not (tmp_path / 'run').exists()  # no imports, no file, no folder
  plugins.record(str(tmp_path / 'run'), ['a', 'b', 'a'])
  plugins.record(str(tmp_path / 'run'), ['c', 'b'])
  assert plugins.saved_imports(str(tmp_path / 'run')) == ['a', 'b', 'c']
  (tmp_path / 'run' / plugins.IMPORTS_FILE).write_text('{"a": 1}')
  with pytest.raises(UserError, match='JSON list of module names'):
    plugins.saved_imports(str(tmp_path / 'run'))
  with pytest.raises(UserError, match="cannot import module 'no_such_module_xyz'"):
    plugins.import_modules(['no_such_module_xyz'])


def test_an_imported_rule_trains_resumes_and_evaluates_from_the_workdir(tmp_path):
  write_module(tmp_path, 'my_rules', 'mine_static')
  out = main(
    '--import=my_rules', *TINY, '--config.sparsity.rule=mine_static', '--workdir=run', cwd=tmp_path
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads((tmp_path / 'run' / plugins.IMPORTS_FILE).read_text()) == ['my_rules']
  # No --config, no --import: both read from the workdir.
  out = main('--workdir=run', '--config.total_steps=6', cwd=tmp_path)
  assert out.returncode == 0 and 'resumed from step 4' in out.stdout, out.stderr[-2000:]
  out = main('--mode=eval', '--workdir=run', cwd=tmp_path)
  assert out.returncode == 0 and 'eval at step 6' in out.stdout, out.stderr[-2000:]
  os.remove(tmp_path / 'run' / plugins.IMPORTS_FILE)  # what happened before imports.json
  out = main('--mode=eval', '--workdir=run', cwd=tmp_path)
  assert out.returncode == 2 and "'mine_static'" in out.stderr and 'Traceback' not in out.stderr


def test_an_unimportable_module_is_one_line(tmp_path):
  out = main('--import=not_a_module_abc', *TINY, cwd=tmp_path)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert "cannot import module 'not_a_module_abc'" in out.stderr
  assert not (tmp_path / 'runs').exists()


def test_a_sweep_file_imports_and_passes_them_on(tmp_path, monkeypatch):
  write_module(tmp_path, 'sweep_rules_ext', 'sweep_ext_static')
  monkeypatch.syspath_prepend(str(tmp_path))
  (tmp_path / 'sweep.py').write_text(
    textwrap.dedent("""
      def get_sweep():
        return {
          'config': 'configs/mlp_fashion_mnist.py:local',
          'imports': ['sweep_rules_ext'],
          'overrides': [{'rule': 'sweep_ext_static', 'sparsity': 0.5}],
        }
    """)
  )
  runs = sweep.make_runs(str(tmp_path / 'sweep.py'))
  assert 'sweep_ext_static' in registry.RULES
  assert runs[0].command()[3] == '--import=sweep_rules_ext'
  assert sweep.resolve_config(runs[0]).sparsity.rule == 'sweep_ext_static'


def test_entry_points_are_loaded_at_startup(tmp_path):
  """An installed package's sift_jax.plugins entry point registers its names before the config
  is read; here a distribution's metadata folder on the path stands in for `pip install`."""
  write_module(tmp_path, 'ep_rules', 'entry_point_static')
  info = tmp_path / 'ep_rules-1.0.dist-info'
  info.mkdir()
  (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: ep-rules\nVersion: 1.0\n')
  (info / 'entry_points.txt').write_text(f'[{plugins.ENTRY_POINT_GROUP}]\nmine = ep_rules\n')
  code = (
    'from sift_jax import plugins, registry; '
    'print(plugins.load_entry_points(), "entry_point_static" in registry.RULES)'
  )
  out = subprocess.run(
    [sys.executable, '-c', code],
    cwd=REPO,
    env={**os.environ, 'PYTHONPATH': f'{REPO}{os.pathsep}{tmp_path}'},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.stdout.split() == ["['mine']", 'True'], out.stderr[-2000:]


def test_a_refused_config_with_an_import_leaves_no_folder(tmp_path):
  """imports.json is written with config.json, when training starts, never before the checks."""
  write_module(tmp_path, 'my_rules', 'mine_static')
  out = main(
    '--import=my_rules', *TINY, '--config.sparsity.rule=mine_statik', '--workdir=run', cwd=tmp_path
  )
  assert out.returncode == 2 and "did you mean 'mine_static'" in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / 'run').exists()
