"""The docs describe the code as it is: design.md's layout lists every module, links resolve."""

from __future__ import annotations

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(
  os.path.relpath(p, REPO)
  for p in [
    os.path.join(REPO, 'README.md'),
    *glob.glob(os.path.join(REPO, 'docs', '*.md')),
    *glob.glob(os.path.join(REPO, 'benchmarks', 'README.md')),
    *glob.glob(os.path.join(REPO, 'experiments', '*', 'README.md')),
  ]
)


def read(path: str) -> str:
  with open(os.path.join(REPO, path)) as f:
    return f.read()


def layout() -> tuple[set[str], list[str]]:
  """design.md's layout block: the modules it names under sift_jax/ (as paths) and its
  top-level entries (configs/, docs/, ...)."""
  block = read('docs/design.md').split('## Layout', 1)[1].split('```', 2)[1]
  modules, top, package = set(), [], None
  for line in block.splitlines():
    if not line.strip() or line == 'sift_jax/':
      continue
    indent = len(line) - len(line.lstrip())
    first = line.split()[0]
    if indent == 0:
      top.append(first)
      package = None
    elif indent == 2:  # a module of sift_jax, or a package with its files after it
      package = first if first.endswith('/') else None
      if first.endswith('.py'):
        modules.add(f'sift_jax/{first}')
      elif first != 'configs':  # the configs link
        assert package, f'unexpected layout line {line!r}'
    if package and indent > 0:
      words = line.split(None, 1)[1] if indent == 2 else line
      modules |= {f'sift_jax/{package}{m}' for m in re.findall(r'\b(\w+\.py)\b', words)}
  return modules, top


def test_the_layout_lists_every_module_and_only_modules_that_exist():
  listed, top = layout()
  present = {
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, 'sift_jax', '**', '*.py'), recursive=True)
    if not p.startswith(os.path.join(REPO, 'sift_jax', 'configs'))
  }
  missing = sorted(p for p in present - listed if not p.endswith('__init__.py'))
  assert missing == [], f'modules missing from docs/design.md Layout: {missing}'
  gone = sorted(listed - present)
  assert gone == [], f'docs/design.md Layout names modules that do not exist: {gone}'
  assert {'configs/', 'experiments/', 'benchmarks/', 'docs/', 'tests/'} <= set(top)
  assert [t for t in top if not os.path.isdir(os.path.join(REPO, t))] == []


@pytest.mark.parametrize('path', DOCS)
def test_no_doc_calls_an_existing_module_not_implemented(path):
  for line in read(path).splitlines():
    if re.search(r'not (yet )?implemented|reserved for', line, re.I):
      named = re.findall(r'(?:sift_jax/)?(\w+)/', line) + re.findall(r'(\w+)\.py', line)
      existing = [n for n in named if glob.glob(os.path.join(REPO, 'sift_jax', '**', n + '*'))]
      assert not existing, f'{path}: {line.strip()!r} but {existing} exist'


def slug(heading: str) -> str:
  """GitHub's anchor of a markdown heading."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


@pytest.mark.parametrize('path', DOCS)
def test_relative_links_resolve_to_files_and_headings(path):
  text = re.sub(r'```.*?```', '', read(path), flags=re.S)  # links inside code are not links
  broken = []
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if re.match(r'[a-z]+://', target):
      continue
    file, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
    if not os.path.exists(os.path.join(REPO, resolved)):
      broken.append(target)
    elif anchor and resolved.endswith('.md'):
      headings = re.findall(r'^#+ (.+)$', read(resolved), flags=re.M)
      if anchor not in {slug(h) for h in headings}:
        broken.append(target)
  assert broken == [], f'{path}: broken links {broken}'


@pytest.mark.parametrize('path', DOCS)
def test_named_modules_and_commands_exist(path):
  """`sift_jax/<module>.py` paths and `python -m sift_jax.<module>` commands name real files."""
  text = read(path)
  files = set(re.findall(r'\bsift_jax/[\w/]+\.py\b', text))
  files |= {
    'sift_jax/' + m.replace('.', '/') + '.py'
    for m in re.findall(r'python -m sift_jax\.([\w.]+)', text)
  }
  missing = sorted(f for f in files if not os.path.isfile(os.path.join(REPO, f)))
  assert missing == [], f'{path} names files that do not exist: {missing}'
