"""README.md and docs/ stay true: their code runs, and CI runs exactly README's test command."""

from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
  with open(os.path.join(REPO, path)) as f:
    return f.read()


def run_block(path: str, index: int, section: str = '', **replace: str) -> dict:
  """Runs the index-th python block of a markdown file (of one `## section` of it, if given),
  with each `old` text in it replaced by `new` (replace={old: new}); returns its globals."""
  text = read(path)
  if section:
    text = text.split(f'## {section}', 1)[1].split('\n## ', 1)[0]
  code = re.findall(r'```python\n(.*?)```', text, re.S)[index]
  for old, new in replace.items():
    assert old in code, old
    code = code.replace(old, new)
  scope: dict = {}
  exec(compile(code, path, 'exec'), scope)
  return scope


def test_ci_runs_exactly_the_readme_test_command():
  bash = re.search(r'```bash\n(.*?)```', read('README.md'), re.S).group(1)
  test_line = [line for line in bash.splitlines() if 'pytest' in line][0]
  test_command = test_line.split('&& ')[-1].strip()
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    ci_lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  assert test_command in ci_lines


@pytest.mark.real_data
def test_the_train_and_evaluate_example_runs(tmp_path):
  scope = run_block('README.md', 0, 'One-call APIs', **{"'/tmp/run'": repr(str(tmp_path))})
  assert scope['config'].total_steps == 30 and scope['config'].sparsity.rule == 'rigl'
  assert 0.1 < scope['summary']['eval/accuracy'] <= 1.0  # ten classes: a guess scores 0.1
  assert (tmp_path / 'summary.json').is_file()


def test_the_wrap_optax_example_runs():
  scope = run_block('README.md', 1, 'One-call APIs')
  assert scope['active'] == round(0.1 * 32 * 32)
  assert scope['losses'][-1] < 0.9 * scope['losses'][0]


def test_the_sift_layer_example_runs():
  scope = run_block('README.md', 2, 'One-call APIs')
  assert scope['paths'] == [('fc', f'branch_{i}', 'kernel') for i in range(4)]
  masks = scope['opt_state'].sparsity.masks['fc']
  assert [int(masks[f'branch_{i}']['kernel'].sum()) for i in range(4)] == [256 * 256 // 4] * 4
  assert scope['opt_state'].sparsity.masks['Dense_0']['kernel'] is None  # the head stays dense


def test_the_explicit_sparse_training_example_runs():
  scope = run_block('docs/library.md', 0, 'Sparse training')
  assert abs(float(scope['density']) - 6554 / 65536) < 1e-7
  assert float(scope['rule'].metrics(scope['sstate'])['sparsity/churn']) > 0


def test_the_extending_example_runs():
  scope = run_block('docs/library.md', 0, 'Extending')
  assert scope['group'].width == 32 and scope['group'].name == 'two_layer'


def test_the_readme_stays_short():
  """README is the first page (what, install, first commands, APIs, results, map); details
  go to docs/."""
  assert len(read('README.md').splitlines()) <= 250
