"""The sweep runner: run naming and commands, sharding, restart after a kill, dry runs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sift_jax import records, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Three runs of a 32-unit MLP on the embedded digits: two dense seeds and one RigL run.
SWEEP_FILE = """
from sift_jax import sweep

def get_sweep():
  return {{
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {{
      'data.name': 'digits', 'model.hidden': (32,), 'total_steps': {steps}, 'batch_size': 16,
      'log_every_steps': 10, 'eval_every_steps': 30, 'checkpoint_every_steps': 20,
      'eval.max_examples': 64, 'optim.schedule': 'constant', 'sparsity.update_every_steps': 10,
      'progress': False,
    }},
    'overrides': [{{'seed': 0}}, {{'sparsity': 0.5, 'rule': 'rigl', 'seed': 0}}, {{'seed': 1}}],
    'runs_dir': {runs_dir!r},
  }}
"""
STEPS = 60


def write_sweep(folder, runs_dir: str = 'runs', steps: int = STEPS) -> str:
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'sweep.py')
  with open(path, 'w') as f:
    f.write(SWEEP_FILE.format(steps=steps, runs_dir=runs_dir))
  return path


def env() -> dict[str, str]:
  return {**os.environ, 'PYTHONPATH': REPO}


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', 'sift_jax.sweep', *args],
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=600,
    **kwargs,
  )


def start_sweep(path: str, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, '-m', 'sift_jax.sweep', path], cwd=REPO, env=env(), **kwargs
  )


def read_summary(workdir: str) -> dict:
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def attempts(workdir: str) -> int:
  """How many times the sweep started the trainer in this folder."""
  with open(os.path.join(workdir, sweep.LOG)) as f:
    return sum(line.startswith('$ ') for line in f)


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """One uninterrupted sweep, shared by the tests below."""
  path = write_sweep(tmp_path_factory.mktemp('sweep'))
  out = run_cli(path)
  assert out.returncode == 0, out.stdout + out.stderr
  return path, out.stdout


# --------------------------------------------------------------------------- without training


def test_product_varies_the_last_axis_fastest():
  assert sweep.product(a=[1, 2], b=['x', 'y']) == [
    {'a': 1, 'b': 'x'},
    {'a': 1, 'b': 'y'},
    {'a': 2, 'b': 'x'},
    {'a': 2, 'b': 'y'},
  ]
  with pytest.raises(ValueError, match=r"product\(a=...\) needs a non-empty list.*'abc'"):
    sweep.product(a='abc')


def test_run_names_are_readable_and_filesystem_safe():
  assert sweep.run_name({'sift': 'wide', 'sparsity': 0.5, 'seed': 2}) == (
    'sift-wide_sparsity-0.5_seed-2'
  )
  assert sweep.run_name({'model.hidden': (32, 16), 'data.dir': '/a b'}) == (
    'model.hidden-_32_16_data.dir-_a_b'
  )
  assert sweep.run_name({}) == 'base'


def test_short_forms_join_the_config_argument_and_other_keys_become_flags(tmp_path):
  path = write_sweep(tmp_path / 'study')
  runs = sweep.make_runs(path)
  assert [r.name for r in runs] == ['seed-0', 'sparsity-0.5_rule-rigl_seed-0', 'seed-1']
  rigl = runs[1]
  assert rigl.config_arg.endswith(
    'configs/mlp_fashion_mnist.py:local,sparsity=0.5,rule=rigl,seed=0'
  )
  assert '--config.model.hidden=(32,)' in rigl.flags
  assert rigl.workdir == str(tmp_path / 'study' / 'runs' / rigl.name)  # outside cwd: absolute
  config = sweep.resolve_config(rigl)  # as the trainer will parse its command line
  assert (config.sparsity.rule, config.sparsity.level, config.seed) == ('rigl', 0.5, 0)
  assert (config.model.hidden, config.data.name, config.total_steps) == ((32,), 'digits', STEPS)


def test_config_paths_resolve_from_the_repo_root_outside_it(tmp_path, monkeypatch):
  path = write_sweep(tmp_path / 'study')
  monkeypatch.chdir(tmp_path)
  run = sweep.make_runs(path)[0]
  assert run.config_arg == os.path.join(REPO, 'configs/mlp_fashion_mnist.py') + ':local,seed=0'
  assert run.workdir == os.path.join('study', 'runs', 'seed-0')


def test_duplicate_run_names_are_refused(tmp_path):
  path = tmp_path / 'sweep.py'
  path.write_text(
    "def get_sweep():\n  return {'config': 'configs/mlp_fashion_mnist.py', "
    "'overrides': [{'seed': 1}, {'seed': '1'}]}\n"
  )
  with pytest.raises(ValueError, match="give the same run name 'seed-1'"):
    sweep.make_runs(str(path))


def test_shards_split_the_runs_disjointly(tmp_path, monkeypatch):
  runs = list(range(7))
  parts = [sweep.select_shard(runs, f'{i}/3')[0] for i in range(3)]
  assert sorted(sum(parts, [])) == runs
  assert parts[1] == [1, 4]
  monkeypatch.setenv('SLURM_ARRAY_TASK_ID', '2')
  monkeypatch.setenv('SLURM_ARRAY_TASK_COUNT', '3')
  monkeypatch.setenv('SLURM_ARRAY_TASK_MIN', '1')  # an array of --array=1-3
  assert sweep.select_shard(runs, None)[0] == parts[1]
  assert sweep.select_shard(runs, '0/3')[0] == parts[0]  # --shard wins
  with pytest.raises(ValueError, match="--shard='3/3' must be i/n with 0 <= i < n"):
    sweep.select_shard(runs, '3/3')


def test_print_commands_prints_one_trainer_line_per_run_of_the_shard(tmp_path):
  path = write_sweep(tmp_path / 'study')
  out = run_cli(path, '--print_commands', '--shard=0/2')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 2
  assert all(line.startswith('python -m sift_jax.main --config=') for line in lines)
  assert lines[1].endswith(f'--workdir={tmp_path}/study/runs/seed-1')


@pytest.mark.parametrize(
  'listing', [pytest.param('--print_commands', marks=pytest.mark.slow), '--dry_run']
)
def test_a_listing_piped_into_head_ends_quietly(tmp_path, listing):
  path = write_sweep(tmp_path)
  with open(path) as f:
    text = f.read().replace("{'seed': 1}]", "{'seed': 1}] + [{'seed': s} for s in range(2, 600)]")
  with open(path, 'w') as f:
    f.write(text)  # 600 runs: more output than a pipe buffers, so the write after `head` fails
  proc = subprocess.Popen(
    [sys.executable, '-m', 'sift_jax.sweep', path, listing],
    cwd=REPO,
    env=env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline()
  proc.stdout.close()
  assert proc.wait(timeout=600) == 0
  assert proc.stderr.read() == ''


def test_a_missing_config_file_is_one_clear_error(tmp_path):
  path = tmp_path / 'sweep.py'
  path.write_text("def get_sweep():\n  return {'config': 'configs/nope.py:local'}\n")
  out = run_cli(str(path), '--dry_run')
  assert out.returncode == 2
  assert "error: config file 'configs/nope.py' does not exist" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_a_lock_counts_only_while_its_process_lives(tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time; from sift_jax import sweep; '
      'assert sweep.claim(sys.argv[1]) is not None; print("held", flush=True); time.sleep(600)',
      str(tmp_path),
    ],
    env=env(),
    stdout=subprocess.PIPE,
    text=True,
  )
  assert holder.stdout.readline() == 'held\n'
  assert sweep.lock_owner(str(tmp_path)).endswith(f'pid {holder.pid}')
  assert sweep.claim(str(tmp_path)) is None
  holder.kill()  # a sweep killed without any chance to clean up
  holder.wait()
  assert sweep.lock_owner(str(tmp_path)) is None
  fd = sweep.claim(str(tmp_path))
  assert fd is not None
  os.close(fd)


def test_the_progress_line_counts_the_runs_other_sweeps_hold(tmp_path):
  runs = sweep.make_runs(write_sweep(tmp_path))
  assert sweep.progress_line(runs, []) == '[done 0/3, running 1, left 2, failed 0, ETA ?]'
  locks = [sweep.claim(r.workdir) for r in runs[:2]]  # this sweep's run and another sweep's
  try:
    assert sweep.progress_line(runs, []) == '[done 0/3, running 2, left 1, failed 0, ETA ?]'
    assert sweep.progress_line(runs, [runs[2].name]).startswith(
      '[done 0/3, running 2, left 0, failed 1,'
    )
  finally:
    for fd in locks:
      os.close(fd)


def test_the_eta_comes_from_finished_runs_summaries(tmp_path):
  runs = sweep.make_runs(write_sweep(tmp_path))
  # Finished in an earlier sitting that resumed it at step 30 of 60: 30 s for half the run.
  os.makedirs(runs[1].workdir)
  with open(os.path.join(runs[1].workdir, 'config.json'), 'w') as f:
    f.write(sweep.resolve_config(runs[1]).to_json())
  with open(os.path.join(runs[1].workdir, 'summary.json'), 'w') as f:
    json.dump({'wall_time_s': 30.0, 'resumed_from_step': STEPS // 2}, f)
  assert sweep.progress(runs[1])[0] == 'done'
  assert sweep.full_run_seconds(runs[1]) == 60.0
  locks = [sweep.claim(runs[i].workdir) for i in (0, 2)]
  try:
    # Two runs of 60 s left, shared by the two running processes: 60 s.
    assert sweep.progress_line(runs, []) == '[done 1/3, running 2, left 0, failed 0, ETA 0:01:00]'
  finally:
    for fd in locks:
      os.close(fd)


# --------------------------------------------------------------------------- with training


def test_finished_runs_are_skipped_and_dry_run_says_so(finished):
  path, log = finished
  assert '[done 2/3, running 1, left 0, failed 0, ETA' in log
  runs = sweep.make_runs(path)
  stamps = {r.name: os.path.getmtime(os.path.join(r.workdir, 'summary.json')) for r in runs}
  again = run_cli(path)
  assert again.returncode == 0, again.stderr
  assert '3 runs: 3 done, 0 to run' in again.stdout
  for r in runs:
    assert os.path.getmtime(os.path.join(r.workdir, 'summary.json')) == stamps[r.name]
    assert attempts(r.workdir) == 1
  dry = run_cli(path, '--dry_run')
  assert dry.stdout.splitlines()[0] == '3 runs: 3 done, 0 partial, 0 new, 0 running, 0 conflict'


def test_a_longer_run_makes_a_finished_run_resume_and_another_config_conflict(finished, tmp_path):
  path, _ = finished
  runs_dir = os.path.join(os.path.dirname(path), 'runs')
  longer = sweep.make_runs(write_sweep(tmp_path, runs_dir, steps=STEPS + 10))
  assert sweep.status(longer[0]) == ('partial', f'resumes at step {STEPS} of {STEPS + 10}')
  same = sweep.make_runs(write_sweep(tmp_path, runs_dir))[0]
  chatty = dataclasses.replace(same, flags=(*same.flags, '--config.log_every_steps=1'))
  assert sweep.status(chatty) == ('done', '')  # how often it logged does not unfinish a run
  other = same
  other = dataclasses.replace(other, flags=(*other.flags, '--config.optim.lr=0.5'))
  state, detail = sweep.status(other)
  assert state == 'conflict'
  assert 'optim.lr: 0.05 -> 0.5' in detail


@pytest.mark.slow  # trains a sweep of its own (51 s at load 18)
def test_a_failing_run_does_not_stop_the_sweep(tmp_path):
  path = tmp_path / 'sweep.py'
  path.write_text(
    SWEEP_FILE.format(steps=4, runs_dir='runs').replace(
      "[{'seed': 0}, {'sparsity': 0.5, 'rule': 'rigl', 'seed': 0}, {'seed': 1}]",
      # Found by the trainer, not by the sweep's checks (which do not load the data).
      "[{'batch_size': 4096}, {'seed': 0}]",
    )
  )
  out = run_cli(str(path))
  assert out.returncode == 1
  assert 'batch_size-4096: FAILED (exit 2)' in out.stdout
  assert 'error: batch_size=4096 is larger than the train split' in out.stdout  # the trainer's
  assert 'sweep finished: 1/2 done, 1 failed' in out.stdout
  assert os.path.exists(tmp_path / 'runs/seed-0/summary.json')


@pytest.mark.slow  # the lock it relies on: test_a_lock_counts_only_while_its_process_lives
def test_two_sweeps_on_one_file_share_the_runs(finished, tmp_path):
  path = write_sweep(tmp_path)
  procs = [
    start_sweep(path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)
  ]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert all('sweep finished: 3/3 done, 0 failed' in log for log in logs), logs
  runs = sweep.make_runs(path)
  assert [attempts(r.workdir) for r in runs] == [1, 1, 1]  # each trained by one of the two
  started = [sum(f'] {r.name}: starting' in log for log in logs) for r in runs]
  assert started == [1, 1, 1], logs
  assert all(': starting' in log for log in logs), 'one sweep did all the work'
  for run, ref in zip(runs, sweep.make_runs(finished[0]), strict=True):
    assert read_summary(run.workdir)['eval/loss'] == pytest.approx(
      read_summary(ref.workdir)['eval/loss'], rel=1e-6
    )


def final_params(workdir: str):
  import orbax.checkpoint as ocp

  step = sweep.checkpoint_steps(workdir)[-1]
  return ocp.StandardCheckpointer().restore(
    os.path.join(workdir, 'checkpoints', str(step), 'state')
  )['params']


@pytest.mark.parametrize(
  'victim',
  [
    # The trainer gets SIGTERM from the dying sweep, checkpoints and exits (-m slow: the
    # trainer's SIGTERM and resume run by default in test_train.py and test_scale.py).
    pytest.param('sweep', marks=pytest.mark.slow),
    pytest.param('group', marks=pytest.mark.slow),  # sweep and trainer at once: a machine crash
  ],
)
def test_a_sweep_killed_mid_run_resumes_and_matches_an_uninterrupted_one(
  finished, tmp_path, victim
):
  import jax

  reference = sweep.make_runs(finished[0])
  path = write_sweep(tmp_path)
  runs = sweep.make_runs(path)
  proc = start_sweep(
    path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
  )
  second = runs[1].workdir
  deadline = time.time() + 300
  while not (sweep.checkpoint_steps(second) and sweep.checkpoint_steps(second)[-1] >= 20):
    assert time.time() < deadline and proc.poll() is None, 'the sweep ended before the kill'
    time.sleep(0.02)
  if victim == 'group':
    os.killpg(proc.pid, signal.SIGKILL)
  else:
    os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  # Killing the sweep alone, its trainer may still be saving: the restart waits for it.
  assert not os.path.exists(os.path.join(second, 'summary.json')), 'killed too late'
  first_summary = os.path.getmtime(os.path.join(runs[0].workdir, 'summary.json'))

  out = run_cli(path)
  assert out.returncode == 0, out.stdout + out.stderr
  assert f'{runs[1].name}: resuming, resumes at step' in out.stdout
  assert os.path.getmtime(os.path.join(runs[0].workdir, 'summary.json')) == first_summary
  assert [attempts(r.workdir) for r in runs] == [1, 2, 1]
  if victim == 'sweep':  # the death signal reached the trainer, which checkpointed and exited
    with open(os.path.join(second, sweep.LOG)) as f:
      assert 'SIGTERM received: saved a checkpoint' in f.read()
  assert read_summary(second)['resumed_from_step'] >= 20
  for run, ref in zip(runs, reference, strict=True):
    got, want = read_summary(run.workdir), read_summary(ref.workdir)
    for key in ('eval/loss', 'eval/accuracy', 'params/global_norm', 'params/active'):
      assert got[key] == pytest.approx(want[key], rel=1e-6), (run.name, key)
    got_params, want_params = final_params(run.workdir), final_params(ref.workdir)
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_the_report_reads_a_real_sweep(finished, tmp_path):
  from sift_jax.analysis import report

  path, _ = finished
  out = report.write_report(os.path.dirname(path), str(tmp_path))
  assert out['runs'] == 3
  assert out['setting_keys'] == ['sparsity.rule', 'sparsity.level']
  rows = out['table'].splitlines()[2:]
  assert rows[0].startswith('| dense | 0.0 | 2 | ')
  assert rows[1].startswith('| rigl | 0.5 | 1 | ')
  for name in out['plots']:  # one sparsity level: no plot over the level
    assert os.path.getsize(tmp_path / name) > 20_000


def test_the_readme_sweep_example_is_a_valid_sweep(tmp_path):
  with open(os.path.join(REPO, 'docs', 'sweeps.md')) as f:
    section = f.read()
  code = section.split('```python\n', 1)[1].split('```', 1)[0]
  (tmp_path / 'sweep.py').write_text(code)
  runs = sweep.make_runs(str(tmp_path / 'sweep.py'))
  assert len(runs) == 12
  assert runs[0].name == 'sift-wide_sparsity-0.5_rule-rigl_seed-0'
  assert runs[0].flags == ('--config.total_steps=1500',)


def test_records_outlive_the_run_folders(finished, tmp_path):
  """A sweep copied without its run folders (another machine) is done from its records alone,
  and the report from the records is byte for byte the report from the run folders."""
  from sift_jax.analysis import report

  path, _ = finished
  study = os.path.dirname(path)
  record_dirs = sorted(os.listdir(os.path.join(study, 'records')))
  assert record_dirs == sorted(r.name for r in sweep.make_runs(path))
  for name in record_dirs:
    assert sorted(os.listdir(os.path.join(study, 'records', name))) == [
      'config.json',
      'metrics.jsonl.gz',
      'summary.json',
    ]
  report.write_report(os.path.join(study, 'runs'), str(tmp_path / 'from_runs'))
  copy = tmp_path / 'clone'
  copy.mkdir()
  shutil.copy(path, copy / 'sweep.py')
  shutil.copytree(os.path.join(study, 'records'), copy / 'records')
  dry = run_cli(str(copy / 'sweep.py'), '--dry_run')
  assert dry.returncode == 0, dry.stderr
  assert dry.stdout.splitlines()[0] == '3 runs: 3 done, 0 partial, 0 new, 0 running, 0 conflict'
  assert 'done      seed-0: recorded' in dry.stdout
  report.write_report(str(copy / 'runs'), str(tmp_path / 'from_records'))
  for name in os.listdir(tmp_path / 'from_runs'):
    a = (tmp_path / 'from_runs' / name).read_bytes()
    assert a == (tmp_path / 'from_records' / name).read_bytes(), name
  # Rewriting a record of the same run changes no byte (records are committed).
  run = sweep.make_runs(path)[0]
  assert not records.save(run.workdir, run.record)
