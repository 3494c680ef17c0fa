"""Extensions that live outside sift_jax: user modules and installed packages that register names.

A model, rule, Sparse-IFT member or dataset registered in the user's own module exists only once
that module is imported. Three ways bring one in before a config is read:

- `--import=module` on the command line of `sift_jax.main` (repeatable). The names are recorded
  in the run's workdir (`imports.json`, beside `config.json`), so `--mode=eval --workdir=DIR`,
  resuming with `--workdir=DIR` and the sweep's reruns import them again without the flag.
- `'imports': ['module', ...]` in a sweep file's `get_sweep()`: the sweep imports them and passes
  `--import` to every run.
- A package's entry points in the group `sift_jax.plugins` (pyproject:
  `[project.entry-points."sift_jax.plugins"] name = "package.module"`), loaded at every start.

Modules are imported by name, from the working directory or PYTHONPATH like any `python -m`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
from collections.abc import Iterable, Sequence

from sift_jax.errors import UserError

ENTRY_POINT_GROUP = 'sift_jax.plugins'
IMPORTS_FILE = 'imports.json'  # in a workdir: the modules its run imported


def flag_values(argv: Sequence[str], name: str) -> list[str]:
  """Every value of a repeatable `--name=V` / `--name V` in argv, in order."""
  values = []
  for i, a in enumerate(argv):
    if a.startswith(f'--{name}='):
      values.append(a.split('=', 1)[1])
    elif a == f'--{name}' and i + 1 < len(argv):
      values.append(argv[i + 1])
  return values


def import_modules(names: Iterable[str], source: str = 'given by --import') -> None:
  """Imports each module by name; one that cannot be imported is a UserError naming it."""
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise UserError(
        f'cannot import module {name!r} ({source}): {e}; run from the folder holding it or add '
        'that folder to PYTHONPATH'
      ) from e


def load_entry_points() -> list[str]:
  """Imports every installed package's `sift_jax.plugins` entry point; returns their names."""
  points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
  for point in points:
    try:
      point.load()
    except ImportError as e:
      raise UserError(
        f'entry point {point.name} = {point.value} ({ENTRY_POINT_GROUP}) cannot be imported ({e})'
      ) from e
  return [point.name for point in points]


def saved_imports(workdir: str | None) -> list[str]:
  """The modules recorded in a workdir by `record` ([] when none were)."""
  path = os.path.join(workdir or '', IMPORTS_FILE)
  if not workdir or not os.path.isfile(path):
    return []
  try:
    with open(path) as f:
      names = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e}); delete it and pass --import again') from e
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise UserError(f'{path} must hold a JSON list of module names, got {names!r}')
  return names


def record(workdir: str, names: Sequence[str]) -> None:
  """Adds `names` to the workdir's imports.json (first use order); writes nothing for none."""
  known = saved_imports(workdir)
  new = [n for n in dict.fromkeys(names) if n not in known]
  if not new:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, IMPORTS_FILE), 'w') as f:
    json.dump(known + new, f)


def load_for_command_line(argv: Sequence[str]) -> list[str]:
  """Entry points, then the --import modules and those recorded in --workdir; returns the
  --import names (for `record`). Called before the config is read, which may name them."""
  load_entry_points()
  workdirs = flag_values(argv, 'workdir')
  workdir = workdirs[-1] if workdirs else None
  import_modules(saved_imports(workdir), source=f'recorded in {workdir}/{IMPORTS_FILE}')
  names = flag_values(argv, 'import')
  import_modules(names)
  return names
