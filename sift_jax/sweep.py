"""Sweep runner: `python -m sift_jax.sweep experiments/<study>/sweep.py [--dry_run] [--shard=i/n]`.

A sweep file defines `get_sweep()` returning a dict:

    def get_sweep():
      return {
        'config': 'configs/mlp_fashion_mnist.py:local',   # file[:arg], as --config takes it
        'fixed': {'total_steps': 600},                    # optional: every run, not in names
        'overrides': sweep.product(sift=['dense', 'wide'], seed=[0, 1, 2]),  # or a list of dicts
      }

Override keys are the config argument's short forms (`sift`, `sparsity`, `rule`, `seed`), which
join the argument after the colon, or any config key (`optim.lr`), passed as `--config.KEY=V`.
Each run gets one workdir under the study's `runs/` named from its overrides, and is trained by
`python -m sift_jax.main` in its own process, so a crash does not stop the sweep and each run's
memory is returned. A run whose summary.json was written for exactly its config is skipped; an
interrupted one resumes from its checkpoints (the trainer's own resume). A finished run's record
(config, summary and gzipped metrics, sift_jax/records.py) is written under the study's
records/ folder, beside runs/: committed, it makes the run done on any machine, run folder or not.

Several sweep processes may work through the same file at once (one per core, say, each pinned
with taskset): a process takes a run by an exclusive lock on the run's `sweep.lock`, held by the
sweep and its trainer until both have exited, so no run is trained twice; runs another process
holds are passed over and waited for at the end. (`--shard` splits the list statically instead,
for machines that do not share a file system.)
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from sift_jax import config_lib, metrics, plugins, records
from sift_jax import workdir as workdir_lib
from sift_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = 'sweep.lock'  # flock()ed while a sweep trains the run; holds that sweep's host and pid
LOG = 'sweep.log'  # the trainer's stdout and stderr, appended per attempt
STATES = ('done', 'partial', 'new', 'running', 'conflict')  # what status() can say of a run


def product(**axes: Sequence[Any]) -> list[dict[str, Any]]:
  """The grid of all combinations, the first axis varying slowest: product(a=[1, 2], b=[3])."""
  for key, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise ValueError(f'product({key}=...) needs a non-empty list of values, got {values!r}')
  keys = list(axes)
  return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its name, folder and the command line that trains it."""

  name: str
  workdir: str
  config_arg: str  # path:arg for --config
  flags: tuple[str, ...]  # --config.KEY=VALUE
  overrides: Mapping[str, Any]
  imports: tuple[str, ...] = ()  # the sweep file's 'imports': modules registering names

  def argv(self) -> list[str]:
    return [f'--config={self.config_arg}', *self.flags]

  def command(self) -> list[str]:
    imports = [f'--import={m}' for m in self.imports]
    return [
      sys.executable,
      '-m',
      'sift_jax.main',
      *imports,
      *self.argv(),
      f'--workdir={self.workdir}',
    ]

  def shell_command(self) -> str:
    """The command as a scheduler would run it (`python` from its PATH)."""
    return shlex.join(['python', *self.command()[1:]])

  @property
  def record(self) -> str | None:
    """Where the run's record is kept (sift_jax/records.py), None outside a runs/ folder."""
    return records.record_path(self.workdir)


def format_value(value: Any) -> str:
  """A value as config_flags parses it back: True, 0.5, (32, 32), text."""
  if isinstance(value, (list, tuple)):
    return '(' + ''.join(f'{format_value(v)},' for v in value) + ')'
  return str(value)


def run_name(overrides: Mapping[str, Any]) -> str:
  """sift-wide_sparsity-0.5_seed-0: readable, stable for a given sweep file, filesystem-safe."""
  if not overrides:
    return 'base'
  name = '_'.join(f'{k}-{format_value(v)}' for k, v in overrides.items())
  return re.sub(r'[^A-Za-z0-9.+-]+', '_', name).strip('_')


def find_file(path: str, sweep_dir: str) -> str:
  """A config path as given (cwd), else beside the sweep file, else under the repo root, else
  among the shipped configs (`configs/<file>.py` in an installed package, no checkout)."""
  for base in ('', sweep_dir, REPO):
    candidate = os.path.join(base, path)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  try:
    return os.path.abspath(config_lib.resolve_config_path(path))
  except config_lib.ConfigError as e:
    raise FileNotFoundError(f'{e}; nor is it in {sweep_dir} or {REPO}') from None


def shown_path(path: str) -> str:
  """Relative to the working directory when under it (short commands), else absolute."""
  rel = os.path.relpath(path)
  return path if rel.startswith('..') else rel


def load_sweep(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'sweep file {path!r} does not exist')
  module = config_lib.exec_file(path, 'sift_jax_sweep_file', 'sweep file')
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'sweep file {path} defines no get_sweep()')
  sweep = module.get_sweep()
  unknown = set(sweep) - {'config', 'fixed', 'overrides', 'runs_dir', 'imports'}
  if unknown or 'config' not in sweep:
    raise ValueError(
      f'get_sweep() of {path} returned keys {sorted(sweep)}; needs config, may have fixed, '
      'overrides, runs_dir, imports'
    )
  imports = sweep.get('imports', ())
  if isinstance(imports, str) or not all(isinstance(m, str) for m in imports):
    raise ValueError(f"get_sweep() of {path}: 'imports' must be a list of module names")
  # The runs' configs may name what these modules register; the trainers get --import.
  plugins.load_entry_points()
  plugins.import_modules(imports, source=f"'imports' of {path}")
  return sweep


def make_runs(sweep_path: str) -> list[Run]:
  """The runs of a sweep file, in its order, with their workdirs under runs_dir (default runs/)."""
  sweep = load_sweep(sweep_path)
  sweep_dir = os.path.dirname(os.path.abspath(sweep_path))
  file, _, base_arg = sweep['config'].partition(':')
  file = shown_path(find_file(file, sweep_dir))
  overrides = sweep.get('overrides') or [{}]
  if isinstance(overrides, Mapping):
    overrides = product(**overrides)
  runs_dir = shown_path(os.path.join(sweep_dir, sweep.get('runs_dir', 'runs')))
  runs, seen = [], {}
  for o in overrides:
    name = run_name(o)
    if name in seen:
      raise ValueError(f'overrides {seen[name]} and {o} give the same run name {name!r}')
    seen[name] = o
    args = config_lib.parse_arg(base_arg)
    keys = {**sweep.get('fixed', {}), **o}
    args.update({k: str(v) for k, v in keys.items() if k in config_lib.SHORT_FORMS})
    long = [
      f'--config.{k}={format_value(v)}' for k, v in keys.items() if k not in config_lib.SHORT_FORMS
    ]
    arg = config_lib.join_arg(args)
    runs.append(
      Run(
        name,
        os.path.join(runs_dir, name),
        f'{file}:{arg}' if arg else file,
        tuple(long),
        o,
        tuple(sweep.get('imports', ())),
      )
    )
  return runs


def resolve_config(run: Run):
  """The config the trainer will build from the run's command line (same parser as main.py)."""
  values = flags.FlagValues()
  argv = ['sweep', *run.argv()]
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def check_runs(runs: list[Run]) -> list[Run]:
  """Builds and checks every run's config before anything trains; returns the runs less the
  duplicates, each said on a line.

  Unknown keys (with the closest known one), unknown names (validation.validate) and bad values
  raise one ConfigError naming the runs. Runs that resolve to the same config ({'sparsity': 0.5}
  and {'sparsity': 0.5, 'rule': 'static'}) would train the same thing twice: the first is kept.
  """
  from sift_jax import validation  # builds models: loaded when a sweep checks, not to list one

  problems: dict[str, list[str]] = {}
  first: dict[str, Run] = {}
  unique = []
  for run in runs:
    try:
      config_lib.config_from_argv(['sweep', *run.argv()])  # unknown keys, with the closest one
      config = resolve_config(run)
      validation.validate(config)
    except (UserError, ValueError, flags.Error) as e:
      problems.setdefault(str(e), []).append(run.name)
      continue
    key = json.dumps(flat_json(json.loads(config.to_json())), sort_keys=True)
    if key in first:
      note = f'note: run {run.name} resolves to the config of run {first[key].name}: trained once'
      print(note, file=sys.stderr, flush=True)
      continue
    first[key] = run
    unique.append(run)
  if problems:
    raise config_lib.ConfigError(
      '; '.join(f'run {", ".join(names)}: {problem}' for problem, names in problems.items())
    )
  return unique


def flat_json(obj: Any) -> dict[str, Any]:
  """A config as flat {dotted key: JSON value}, tuples and lists alike."""
  return config_lib.flatten(json.loads(json.dumps(metrics.plain(obj))))


def read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def checkpoint_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []


def claim(workdir: str) -> int | None:
  """Takes the run in `workdir` for this process: a descriptor holding the flock() on its
  sweep.lock (workdir.take_lock), or None if another process holds it. The trainer inherits the
  descriptor, so the lock goes only when the last of this sweep and its trainer exits."""
  os.makedirs(workdir, exist_ok=True)
  return workdir_lib.take_lock(os.path.join(workdir, LOCK))


def lock_owner(workdir: str) -> str | None:
  """Who holds the run in `workdir` ('host pid' of its sweep), or None if no process does."""
  return workdir_lib.lock_owner(os.path.join(workdir, LOCK))


def wait_for(workdir: str, name: str) -> None:
  """Blocks until no process holds the run in `workdir`."""
  print(f'{name}: waiting for {lock_owner(workdir)} (a sweep still working on it)', flush=True)
  with open(os.path.join(workdir, LOCK)) as f:
    fcntl.flock(f, fcntl.LOCK_EX)


def config_diff(run: Run, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{flat key: (saved, run's)} for every key whose value differs (workdir.config_diff)."""
  return workdir_lib.config_diff(saved, resolve_config(run))


def recorded(run: Run) -> bool:
  """Whether the run's committed record holds it finished, with its config and length."""
  saved = run.record and records.finished(run.record) and records.read_config(run.record)
  if not saved:
    return False
  diff = config_diff(run, saved)
  return 'total_steps' not in diff and all(k in workdir_lib.RESUMABLE for k in diff)


def progress(run: Run) -> tuple[str, str]:
  """(state, detail) from the folder's files and the run's record alone: done, partial, new, or
  conflict. A run whose folder is gone (another machine) but whose record is committed is done."""
  saved = read_json(os.path.join(run.workdir, 'config.json'))
  if saved is None:
    return ('done', 'recorded') if recorded(run) else ('new', '')
  diff = config_diff(run, saved)
  hard = {k: v for k, v in diff.items() if k not in workdir_lib.RESUMABLE}
  if hard:
    details = workdir_lib.describe(hard, 5)
    return 'conflict', f'the folder holds a run of another config ({details})'
  summary = os.path.join(run.workdir, 'summary.json')
  config_path = os.path.join(run.workdir, 'config.json')
  # config.json is rewritten at every (re)start, summary.json at the end: an older summary
  # belongs to an earlier, shorter run of this folder. Other run-length keys (how often it
  # logged) do not make a finished run unfinished.
  if (
    'total_steps' not in diff
    and os.path.exists(summary)
    and os.path.getmtime(summary) >= os.path.getmtime(config_path)
  ):
    return 'done', ''
  if recorded(run):
    return 'done', 'recorded'
  steps = checkpoint_steps(run.workdir)
  last = steps[-1] if steps else 0
  return 'partial', f'resumes at step {last} of {resolve_config(run).total_steps}'


def save_records(runs: list[Run]) -> None:
  """Writes the record of every run finished in its folder whose record is missing or stale."""
  written = [
    r.record
    for r in runs
    if r.record and progress(r) == ('done', '') and records.save(r.workdir, r.record)
  ]
  if written:
    print(f'wrote {len(written)} run records under {os.path.dirname(written[0])}', flush=True)


def status(run: Run) -> tuple[str, str]:
  """(state, detail): done, running (held by a sweep), partial (resumes), new, or conflict."""
  owner = lock_owner(run.workdir)
  return ('running', owner) if owner else progress(run)


def select_shard(runs: list[Run], shard: str | None) -> tuple[list[Run], str]:
  """Every n-th run from i (--shard=i/n, else a SLURM job array's task, else all)."""
  env = os.environ
  if shard:
    m = re.fullmatch(r'(\d+)/(\d+)', shard)
    if not m or not int(m[1]) < int(m[2]):
      raise ValueError(f'--shard={shard!r} must be i/n with 0 <= i < n, e.g. 0/4')
    i, n = int(m[1]), int(m[2])
  elif 'SLURM_ARRAY_TASK_ID' in env and 'SLURM_ARRAY_TASK_COUNT' in env:
    i = int(env['SLURM_ARRAY_TASK_ID']) - int(env.get('SLURM_ARRAY_TASK_MIN', 0))
    n = int(env['SLURM_ARRAY_TASK_COUNT'])
    if not 0 <= i < n:
      raise ValueError(f'SLURM array task {i} (after subtracting the minimum) is not in [0, {n})')
  else:
    return runs, ''
  return runs[i::n], f' (shard {i}/{n})'


def set_death_signal() -> None:
  """In the child: receive SIGTERM when the sweep dies (the trainer then checkpoints and exits),
  so a killed sweep never leaves an orphan writing into a run folder."""
  if sys.platform.startswith('linux'):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def train(run: Run, lock: int) -> int:
  """Trains one run in a child process, which inherits the run's lock; returns its exit code
  (output appended to sweep.log)."""
  env = dict(os.environ)
  # The child imports the same sift_jax as this process, whatever the install.
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  with open(os.path.join(run.workdir, LOG), 'a') as log:
    log.write(f'$ {shlex.join(run.command())}\n')
    log.flush()
    proc = subprocess.Popen(
      run.command(),
      stdout=log,
      stderr=subprocess.STDOUT,
      env=env,
      pass_fds=(lock,),  # a trainer outliving a killed sweep still holds the run
      preexec_fn=set_death_signal,
    )
    try:
      return proc.wait()
    except KeyboardInterrupt:
      proc.wait()  # it got the SIGINT too: it saves a checkpoint and exits
      raise


def tail(path: str, lines: int = 15) -> str:
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-lines:])


def run_sweep(runs: list[Run], shard_note: str = '') -> list[str]:
  """Trains every run not done, one at a time; returns the names of the runs that failed.

  Runs held by another sweep process are passed over, then waited for once nothing else is left
  (if that process died before finishing one, this one resumes it)."""
  save_records(runs)  # finished before this sweep (or by hand): their records too
  todo = [r for r in runs if status(r)[0] != 'done']
  print(
    f'{len(runs)} runs{shard_note}: {len(runs) - len(todo)} done, {len(todo)} to run', flush=True
  )
  failed = []
  while todo:
    held = []
    for run in todo:
      lock = claim(run.workdir)
      if lock is None:
        held.append(run)
        continue
      try:
        state, detail = progress(run)
        if state == 'done':  # finished by another sweep since the list was made
          continue
        print(
          f'{progress_line(runs, failed)} '
          f'{run.name}: {"resuming, " + detail if state == "partial" else "starting"}',
          flush=True,
        )
        if state == 'conflict':
          print(f'  {run.name}: not run: {detail}', flush=True)
          failed.append(run.name)
          continue
        t = time.time()
        code = train(run, lock)
      finally:
        os.close(lock)
      if code == 0 and progress(run)[0] == 'done':
        save_records([run])
        summary = read_json(os.path.join(run.workdir, 'summary.json')) or {}
        result = ', '.join(
          f'{k} {summary[k]:.4f}' for k in ('eval/loss', 'eval/accuracy') if k in summary
        )
        print(f'  {run.name}: done in {time.time() - t:.0f} s ({result})', flush=True)
      else:
        failed.append(run.name)
        log = os.path.join(run.workdir, LOG)
        print(f'  {run.name}: FAILED (exit {code}); last lines of {log}:', flush=True)
        print('    ' + tail(log).replace('\n', '\n    '), flush=True)
    if held and len(held) == len(todo):  # everything left is another sweep's: wait for one
      wait_for(held[0].workdir, held[0].name)
    todo = held
  done = tally(runs)['done']
  print(f'sweep finished: {done}/{len(runs)} done, {len(failed)} failed', flush=True)
  return failed


def tally(runs: list[Run], states: list[tuple[str, str]] | None = None) -> dict[str, int]:
  """How many runs are in each state, read from their folders: other sweeps' work counts too."""
  names = [s for s, _ in states or [status(r) for r in runs]]
  return {s: names.count(s) for s in STATES}


def full_run_seconds(run: Run) -> float | None:
  """A finished run's wall time from its summary.json (in its folder, else its record), scaled
  up to the whole run when its last sitting resumed part way (the summary times only that
  sitting); None if it has none."""
  folder = run.workdir if records.finished(run.workdir) else run.record or run.workdir
  summary = read_json(os.path.join(folder, 'summary.json')) or {}
  total = (read_json(os.path.join(folder, 'config.json')) or {}).get('total_steps')
  seconds, start = summary.get('wall_time_s'), summary.get('resumed_from_step', 0)
  if not seconds or not total or start >= total:
    return None
  return seconds * total / (total - start)


def progress_line(runs: list[Run], failed: list[str]) -> str:
  """'[done d/n, running r, left l, failed f, ETA t]' over every sweep process working on these
  runs (this one's run included in `running`). The ETA assumes the runs left cost what the
  finished ones did on average (from their summaries, so it holds from the first run of a
  restarted sweep), and that the `running` processes share them out."""
  states = [status(r) for r in runs]
  n = tally(runs, states)
  running = max(n['running'], 1)
  left = max(len(runs) - n['done'] - running - len(failed), 0)
  times = [full_run_seconds(r) for r, (s, _) in zip(runs, states, strict=True) if s == 'done']
  times = [t for t in times if t is not None]
  eta = metrics.hms(sum(times) / len(times) * (left + running) / running) if times else '?'
  return f'[done {n["done"]}/{len(runs)}, running {running}, left {left}, failed {len(failed)}, ETA {eta}]'


def print_status(runs: list[Run], shard_note: str = '') -> None:
  """--dry_run: each run's state and what would run."""
  states = [status(r) for r in runs]
  counts = tally(runs, states)
  print(
    f'{len(runs)} runs{shard_note}: ' + ', '.join(f'{counts[k]} {k}' for k in STATES), flush=True
  )
  for run, (state, detail) in zip(runs, states, strict=True):
    print(f'{state:9s} {run.name}{": " + detail if detail else ""}')
    if state != 'done':
      print(f'          {run.shell_command()}')


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError('usage: python -m sift_jax.sweep experiments/<study>/sweep.py [flags]')
  try:
    runs, note = select_shard(check_runs(make_runs(argv[1])), _SHARD.value)
  except (ValueError, FileNotFoundError, UserError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  if _PRINT.value or _DRY_RUN.value:
    try:
      if _PRINT.value:
        for run in runs:
          print(run.shell_command())
      else:
        print_status(runs, note)
    except BrokenPipeError:  # piped into `head`: the reader has what it wanted
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  else:
    try:
      failed = run_sweep(runs, note)
    except KeyboardInterrupt:
      print('interrupted: rerun the same command to resume', flush=True)
      sys.exit(130)
    if failed:
      sys.exit(1)


if __name__ == '__main__':
  # Defined only when run as a program: sweep files import this module for `product`.
  _DRY_RUN = flags.DEFINE_bool('dry_run', False, 'List the runs: which are done, what would run.')
  _SHARD = flags.DEFINE_string('shard', None, 'i/n: run every n-th run from the i-th (0-based).')
  _PRINT = flags.DEFINE_bool(
    'print_commands', False, 'Print one python -m sift_jax.main line per run (this shard).'
  )
  app.run(main)
