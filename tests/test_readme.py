"""README.md stays true: its code runs, and CI runs exactly its test command."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
  with open(os.path.join(REPO, 'README.md')) as f:
    return f.read()


def test_ci_runs_exactly_the_readme_test_command():
  bash = re.search(r'```bash\n(.*?)```', readme(), re.S).group(1)
  test_line = [line for line in bash.splitlines() if 'pytest' in line][0]
  test_command = test_line.split('&& ')[-1].strip()
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    ci_lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  assert test_command in ci_lines


def test_the_sparse_training_example_runs():
  section = readme().split('## Sparse training', 1)[1]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  scope: dict = {}
  exec(compile(code, 'README.md', 'exec'), scope)
  assert abs(float(scope['density']) - 6554 / 65536) < 1e-7
  assert float(scope['rule'].metrics(scope['sstate'])['sparsity/churn']) > 0


def run_block(section: str, index: int) -> dict:
  """Runs the index-th python block of a README section; returns its globals."""
  text = readme().split(f'## {section}', 1)[1].split('\n## ', 1)[0]
  code = re.findall(r'```python\n(.*?)```', text, re.S)[index]
  scope: dict = {}
  exec(compile(code, 'README.md', 'exec'), scope)
  return scope


def test_the_wrap_optax_example_runs():
  scope = run_block('Sparse training', 1)
  assert scope['active'] == round(0.1 * 32 * 32)
  assert scope['losses'][-1] < 0.9 * scope['losses'][0]


def test_the_extending_example_runs():
  scope = run_block('Extending', 0)
  assert scope['group'].width == 32 and scope['group'].name == 'two_layer'
