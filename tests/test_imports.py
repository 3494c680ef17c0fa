"""The package has no import circle: a static check of the import graph, and fresh interpreters
importing modules in orders that used to need imports inside functions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PACKAGE = 'sift_jax'


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package (packages as their name)."""
  out = {}
  for root, _, files in os.walk(os.path.join(REPO, PACKAGE)):
    for f in files:
      if not f.endswith('.py'):
        continue
      rel = os.path.relpath(os.path.join(root, f), REPO)[: -len('.py')].split(os.sep)
      if rel[-1] == '__init__':
        rel = rel[:-1]
      out['.'.join(rel)] = os.path.join(root, f)
  return out


def _parents(name: str) -> list[str]:
  parts = name.split('.')
  return ['.'.join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
  """Module -> the package modules it imports, at any depth (module level or inside functions).

  Importing a submodule also runs its parent packages' __init__; that edge is kept unless the
  parent is already the importer's own parent (then it is initialised before the importer).
  """
  modules = _modules()
  graph: dict[str, set[str]] = {m: set() for m in modules}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    targets = []
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets += [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets.append(node.module)
        targets += [f'{node.module}.{a.name}' for a in node.names]
    own = set(_parents(name)) | ({name} if path.endswith('__init__.py') else set())
    for t in targets:
      for m in [*_parents(t), t]:
        if m in modules and m != PACKAGE and m not in own and m != name:
          graph[name].add(m)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of the graph as a list of modules (first repeated at the end), or None."""
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return [*stack[stack.index(n) :], n]
      if n not in state and (cycle := visit(n)):
        return cycle
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (cycle := visit(m)):
      return cycle
  return None


def test_find_cycle_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_package_import_graph_has_no_cycle():
  graph = import_graph()
  assert 'sift_jax.sparse_layers' in graph['sift_jax.models.layers']
  assert 'sift_jax.sparse_layers' in graph['sift_jax.sift.members']
  assert find_cycle(graph) is None


def test_sparse_layers_import_nothing_of_the_package_above_them():
  graph = import_graph()
  below = {m for m in graph if m.startswith('sift_jax.sparse_layers')}
  for m in below:
    assert graph[m] <= below, (m, graph[m] - below)


@pytest.mark.parametrize(
  'order',
  [
    ('sift_jax.sift.layers', 'sift_jax.models'),
    ('sift_jax.models.layers', 'sift_jax.sift.members'),
    ('sift_jax.sift.match', 'sift_jax.flops'),
  ],
)
def test_fresh_interpreter_imports_in_any_order(order):
  code = ';'.join(f'import {m}' for m in order) + ';import sift_jax.sift as s;print(s.member)'
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr
