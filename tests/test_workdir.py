"""The workdir policy (sift_jax/workdir.py): the keys a resume may change, config_diff, the
fresh-start check and the locks, shared by the trainer, the sweep and the study report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sift_jax import config_lib, sweep, workdir
from sift_jax.analysis import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def saved_json(config) -> dict:
  """A config as its run's config.json holds it (tuples become lists)."""
  return json.loads(json.dumps(json.loads(config.to_json())))


def test_config_diff_compares_saved_json_with_a_config_dict():
  c = config_lib.base_config()
  assert workdir.config_diff(saved_json(c), c) == {}  # lists in the JSON, tuples in the config
  wanted = c.copy_and_resolve_references()
  wanted.optim.lr = 0.5
  wanted.sparsity.block_shape = (4, 4)
  saved = saved_json(c)
  del saved['progress']  # a key an older config.json lacks
  assert workdir.config_diff(saved, wanted) == {
    'optim.lr': (c.optim.lr, 0.5),
    'progress': (None, True),
    'sparsity.block_shape': (list(c.sparsity.block_shape), [4, 4]),
  }


def test_only_the_resumable_keys_may_change_on_resume(tmp_path):
  c = config_lib.base_config()
  resumed = c.copy_and_resolve_references()
  resumed.update(total_steps=2000, log_every_steps=7, progress=False)
  resumed.sparsity.execution = 'block_sparse'  # the restored state is converted
  resumed.data.workers = 4
  assert workdir.resume_conflicts(saved_json(c), resumed) == {}
  resumed.optim.lr = 0.5
  resumed.seed = 3
  assert list(workdir.resume_conflicts(saved_json(c), resumed)) == ['optim.lr', 'seed']

  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(saved_json(c), f)
  with pytest.raises(ValueError, match=r'different config \(optim.lr: 0.1 -> 0.5, seed: 0 -> 3\)'):
    workdir.check_workdir_config(resumed, str(tmp_path))
  longer = c.copy_and_resolve_references()
  longer.total_steps = 2000
  assert workdir.check_workdir_config(longer, str(tmp_path)) == c.total_steps
  assert workdir.check_workdir_config(c, str(tmp_path)) is None
  assert workdir.check_workdir_config(c, str(tmp_path / 'new')) is None


def test_the_report_counts_runs_that_differ_in_bookkeeping_as_one_setting():
  base = config_lib.flatten(saved_json(config_lib.base_config()))
  bookkept = {**base, **{k: f'other {k}' for k in workdir.BOOKKEEPING_KEYS}, 'seed': 1}
  runs = [{'config': base}, {'config': bookkept}]
  assert report.setting_keys(runs) == []
  assert report.setting_keys([*runs, {'config': {**base, 'optim.lr': 9.0}}]) == ['optim.lr']


def test_a_fresh_start_is_refused_on_top_of_a_finished_or_set_aside_run(tmp_path):
  workdir.check_fresh_start(str(tmp_path))  # an empty folder: fine
  (tmp_path / 'checkpoints_diverged' / '3').mkdir(parents=True)
  with pytest.raises(workdir.RunStateError, match=r'checkpoints_diverged\); refusing to start'):
    workdir.check_fresh_start(str(tmp_path))
  (tmp_path / 'checkpoints_diverged' / '3').rmdir()
  workdir.check_fresh_start(str(tmp_path))  # an empty set-aside folder held nothing
  (tmp_path / 'summary.json').write_text('{}')
  with pytest.raises(workdir.RunStateError, match=r'summary.json\); refusing to start'):
    workdir.check_fresh_start(str(tmp_path))


def test_the_trainer_lock_names_its_holder_and_is_not_the_sweeps(tmp_path):
  d = str(tmp_path)
  lock_file = os.path.join(d, workdir.TRAINER_LOCK)
  with workdir.trainer_lock(d):
    assert workdir.lock_owner(lock_file).endswith(f'pid {os.getpid()}')
    # flock() locks belong to open files: a second open in this process is refused too.
    busy = pytest.raises(workdir.WorkdirBusyError, match=f'pid {os.getpid()}\\); wait for it')
    with busy, workdir.trainer_lock(d):
      pass
    held = sweep.claim(d)  # a sweep's lock on the run is another file: the trainer it starts
    assert held is not None  # holds its own
    os.close(held)
  assert workdir.lock_owner(lock_file) is None  # released, and the file stays
  with workdir.trainer_lock(d):
    pass


def test_the_sweep_and_the_report_do_not_load_the_trainer():
  code = (
    'import sys, sift_jax.sweep, sift_jax.analysis.report, sift_jax.workdir; '
    'print([m for m in ("sift_jax.train", "sift_jax.experiment") if m in sys.modules])'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]'
