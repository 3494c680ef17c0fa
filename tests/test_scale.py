"""Scaling out: fsdp shardings, multi-process runs through the launcher, surviving bad checkpoints.

Multi-device cases run in subprocesses (the device count is fixed when JAX starts); this file
is also their worker: `python tests/test_scale.py <mode> <out> [mesh.fsdp]`.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))

from jax.sharding import SingleDeviceSharding  # noqa: E402
from test_train import assert_trees_equal, final_params, read_jsonl, tiny_config  # noqa: E402

from sift_jax import config_lib, errors, experiment, launch, sharding, train  # noqa: E402
from sift_jax.sparsity.plan import path_of  # noqa: E402

# The `local` GPT with RigL: masks change at steps 2 and 4 of 6.
RIGL = {'sparsity.rule': 'rigl', 'sparsity.level': 0.75, 'sparsity.update_every_steps': 2}
MLP_FLAGS = [
  f'--config={REPO}/configs/mlp_fashion_mnist.py:local',
  '--config.data.name=digits',
  '--config.model.hidden=(32,)',
  '--config.eval.max_examples=64',
  '--config.progress=False',
]


def scale_config(fsdp: int = 1):
  c = tiny_config('gpt')
  for key, value in RIGL.items():
    group, leaf = key.split('.')
    c[group][leaf] = value
  c.mesh.fsdp = fsdp
  c.mesh.fsdp_min_size = 0  # shard every leaf that divides, however small
  return c


def config_flags(c) -> list[str]:
  """The command-line flags that turn `gpt_small_dense.py:local` into `c` (for the launcher)."""
  path = os.path.join(REPO, 'configs', 'gpt_small_dense.py')
  base = config_lib.flatten(json.loads(config_lib.load_config(path, 'local').to_json()))
  flat = config_lib.flatten(json.loads(c.to_json()))
  return [f'--config={path}:local'] + [
    f'--config.{k}={v}' for k, v in sorted(flat.items()) if v != base.get(k)
  ]


def read_params(workdir) -> list[np.ndarray]:
  """The final params' leaves, whatever topology wrote them, on this process's one device."""
  steps = [int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()]
  path = os.path.join(workdir, 'checkpoints', str(max(steps)), 'state')
  meta = ocp.StandardCheckpointer().metadata(path)
  one = SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
    getattr(meta, 'item_metadata', meta),
  )
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(path, target)['params'])


def assert_close_params(a: list[np.ndarray], b: list[np.ndarray]) -> None:
  """Equal sparsity patterns (the same RigL masks) and values up to reduction order."""
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x == 0, y == 0)
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)


def losses(workdir) -> list[float]:
  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return [r['train/loss'] for r in rows] + [rows[-1]['eval/loss']]


def run_launcher(
  args: list[str], processes: int, devices: int, **kw
) -> subprocess.CompletedProcess:
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'sift_jax.launch',
      f'--processes={processes}',
      f'--devices_per_process={devices}',
      '--',
      *args,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
    **kw,
  )


def worker(mode: str, out: str, fsdps: list[int]) -> None:
  """Runs in a subprocess with several devices (or as one of several processes).

  'masks': one RigL update of the same arrays under every layout (one device, and the mesh of
  each mesh.fsdp in `fsdps`), masks and updated params saved to `out`.npz by process 0.
  'all': 'masks', then a short training run with the last mesh.fsdp into `out`.
  """
  train.use_compilation_cache()
  launch.initialize(scale_config())
  results = {}
  one = SingleDeviceSharding(jax.devices()[0])
  for fsdp in fsdps:
    exp = experiment.build_experiment(scale_config(fsdp))
    state = exp.new_state()
    check_layout(state, exp.rule)
    layouts = {f'fsdp{fsdp}': exp.state_shardings()}
    if jax.process_count() == 1:
      layouts['one_device'] = jax.tree.map(lambda _: one, layouts[f'fsdp{fsdp}'])
    for name, shardings in layouts.items():
      results.update(mask_update(exp, jax.device_put(state, shardings), name))
  if jax.process_index() == 0:
    np.savez(out + '.npz', **results)
  if mode == 'all':
    train.train_and_evaluate(scale_config(fsdps[-1]), out)


def random_like(tree):
  """Gradient stand-ins: normal noise per leaf (the same values under any sharding)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


def mask_update(exp, state, name: str) -> dict[str, np.ndarray]:
  """Masks before and after a RigL update at step 2, and the updated params, as numpy."""
  shardings = jax.tree.map(lambda x: x.sharding, state.params)
  grads = jax.jit(random_like, out_shardings=shardings)(state.params)
  sstate, params, _ = jax.jit(exp.rule.update_masks)(
    state.sparsity, state.params, grads, state.opt_state, jnp.int32(2)
  )
  before = jax.tree.leaves(sharding.fetch(state.sparsity.masks))
  after = jax.tree.leaves(sharding.fetch(sstate.masks))
  out = {f'{name}/before/{i}': m for i, m in enumerate(before)}
  out.update({f'{name}/after/{i}': m for i, m in enumerate(after)})
  out[f'{name}/params'] = np.concatenate(
    [np.ravel(p) for p in jax.tree.leaves(sharding.fetch(params))]
  )
  return out


def check_layout(state, rule) -> None:
  params = dict(zip(rule.paths, jax.tree.leaves(state.params), strict=True))
  masks = jax.tree_util.tree_flatten_with_path(state.sparsity.masks)[0]
  assert masks, 'no sparse layers'
  for kp, m in masks:
    assert m.sharding == params[path_of(kp)].sharding, path_of(kp)
  for kp, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    path = path_of(kp)
    match = [p for p in rule.paths if path[-len(p) :] == p and params[p].shape == leaf.shape]
    if match:
      assert leaf.sharding == params[max(match, key=len)].sharding, path


def run_worker(mode: str, out, fsdps: list[int], devices: int) -> None:
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  res = subprocess.run(
    [sys.executable, __file__, mode, str(out), ','.join(map(str, fsdps))],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert res.returncode == 0, res.stderr[-3000:]


def assert_same_masks(results: dict, ref: str, other: str) -> None:
  names = [k[len(ref) + 1 :] for k in results if k.startswith(ref + '/')]
  assert len(names) > 5
  for n in names:
    np.testing.assert_array_equal(results[f'{ref}/{n}'], results[f'{other}/{n}'], err_msg=n)


# --------------------------------------------------------------------------- shardings


@pytest.mark.parametrize(
  'shape, fsdp, min_size, spec',
  [
    ((7, 12), 4, 0, (None, 'fsdp')),  # the first axis that divides, not the largest
    ((12, 7), 4, 0, ('fsdp',)),
    ((7, 13), 2, 0, ()),  # nothing divides: replicated
    ((3, 3, 6, 10), 2, 0, (None, None, 'fsdp')),
    ((64,), 2, 65, ()),  # below the size floor
    ((64,), 2, 64, ('fsdp',)),
    ((), 2, 0, ()),
    ((8, 8), 1, 0, ()),
  ],
)
def test_leaf_spec(shape, fsdp, min_size, spec):
  assert tuple(sharding.leaf_spec(shape, fsdp, min_size)) == spec


def test_fsdp_masks_and_updates_match_data_parallel_and_one_device(tmp_path):
  """Same seed: masks after a RigL update on one device, 8 data, 4 data x 2 fsdp; the losses
  of a 4 x 2 fsdp run and a one-device run."""
  run_worker('all', tmp_path / 'dev8', [1, 2], 8)
  results = dict(np.load(tmp_path / 'dev8.npz'))
  assert_same_masks(results, 'fsdp1', 'one_device')
  assert_same_masks(results, 'fsdp1', 'fsdp2')
  before = [v for k, v in results.items() if k.startswith('fsdp1/before/')]
  after = [v for k, v in results.items() if k.startswith('fsdp1/after/')]
  assert all(m.dtype == bool for m in after)
  assert [m.sum() for m in before] == [m.sum() for m in after]  # exact counts kept
  assert any((b != a).any() for b, a in zip(before, after, strict=True))  # and masks moved
  train.train_and_evaluate(scale_config(), str(tmp_path / 'dev1'))
  np.testing.assert_allclose(losses(tmp_path / 'dev1'), losses(tmp_path / 'dev8'), rtol=2e-5)


# --------------------------------------------------------------------------- processes


def launch_and_match_one_device(tmp_path, c, name: str, devices: int) -> None:
  """Runs `c` on 2 processes of `devices` devices and on 1 device; asserts equal losses."""
  train.train_and_evaluate(scale_config(), str(tmp_path / 'one'))
  res = run_launcher(
    [*config_flags(c), f'--workdir={tmp_path / name}'], processes=2, devices=devices
  )
  assert res.returncode == 0, res.stderr[-3000:]
  with open(tmp_path / name / 'summary.json') as f:
    summary = json.load(f)
  assert (summary['process_count'], summary['device_count']) == (2, 2 * devices)
  np.testing.assert_allclose(losses(tmp_path / 'one'), losses(tmp_path / name), rtol=2e-5)


@pytest.mark.slow  # the launcher's 2-process run is in test_scripts.py's default run
def test_two_processes_through_the_launcher_match_one_process(tmp_path):
  launch_and_match_one_device(tmp_path, scale_config(), 'two', devices=1)
  assert_close_params(read_params(tmp_path / 'one'), read_params(tmp_path / 'two'))


@pytest.mark.slow
def test_two_processes_of_four_devices_with_fsdp_match_one_device(tmp_path):
  """2 processes x 4 devices as 4 data x 2 fsdp: losses and mask updates as on 1 device."""
  launch_and_match_one_device(tmp_path, scale_config(fsdp=2), 'pod', devices=4)

  run_worker('masks', tmp_path / 'one', [1], 1)
  command = [sys.executable, __file__, 'masks', str(tmp_path / 'pod'), '2']
  assert launch.run_local(command, processes=2, devices_per_process=4) == 0
  results = {**np.load(tmp_path / 'one.npz'), **np.load(tmp_path / 'pod.npz')}
  assert_same_masks(results, 'fsdp1', 'fsdp2')


# --------------------------------------------------------------------------- preemption


def run_mlp(workdir, *extra: str, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', 'sift_jax.main', *MLP_FLAGS, *extra, f'--workdir={workdir}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    **kw,
  )


def wait_for(predicate, proc, what: str, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f'the run ended before {what}'
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.05)


@pytest.mark.slow  # default run: test_train.py's SIGTERM at the next step, then resume tests
def test_sigterm_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
  steps = ['--config.total_steps=300', '--config.checkpoint_every_steps=100']
  straight = run_mlp(tmp_path / 'straight', *steps)
  assert straight.returncode == 0, straight.stderr[-2000:]
  workdir = tmp_path / 'stopped'
  proc = subprocess.Popen(
    [sys.executable, '-m', 'sift_jax.main', *MLP_FLAGS, *steps, f'--workdir={workdir}'],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  wait_for(lambda: (workdir / 'metrics.jsonl').exists(), proc, 'the first log line')
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0
  assert 'SIGTERM received: saved a checkpoint at step' in out
  stopped_at = max(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert 0 < stopped_at < 300
  rerun = run_mlp(workdir, *steps)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  with open(workdir / 'summary.json') as f:
    assert json.load(f)['resumed_from_step'] == stopped_at
  assert_trees_equal(final_params(tmp_path / 'straight'), final_params(workdir))


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_processes_at_one_step(tmp_path):
  c = scale_config()
  c.total_steps = 400
  c.checkpoint_every_steps = 1000
  c.eval_every_steps = 1000
  flags = config_flags(c)
  straight = run_launcher([*flags, f'--workdir={tmp_path / "straight"}'], processes=2, devices=1)
  assert straight.returncode == 0, straight.stderr[-3000:]
  workdir = tmp_path / 'stopped'
  proc = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'sift_jax.launch',
      '--processes=2',
      '--',
      *flags,
      f'--workdir={workdir}',
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  wait_for(lambda: (workdir / 'metrics.jsonl').exists(), proc, 'the first log line', 600)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert out.count('saved a checkpoint at step') == 2, out[-3000:]
  stopped_at = max(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert 0 < stopped_at < 400
  rerun = run_launcher([*flags, f'--workdir={workdir}'], processes=2, devices=1)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  with open(workdir / 'summary.json') as f:
    assert json.load(f)['resumed_from_step'] == stopped_at
  assert_close_params(read_params(tmp_path / 'straight'), read_params(workdir))


# --------------------------------------------------------------------------- bad checkpoints

# Stops the run inside the save of step 6, after orbax wrote every file and before its rename.
KILL_IN_SAVE = f"""
import os, sys, time
sys.path.insert(0, {REPO!r})
from sift_jax import checkpointing
seal = checkpointing.Checkpointer._seal_pending
def stall(self):
  seal(self)
  if self._pending == 6:
    open(os.path.join(self.workdir, 'in_save'), 'w').close()
    time.sleep(600)
checkpointing.Checkpointer._seal_pending = stall
from sift_jax import main
main.run(['main', *sys.argv[1:]])
"""


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
  steps = ['--config.total_steps=9', '--config.checkpoint_every_steps=3']
  straight = run_mlp(tmp_path / 'straight', *steps)
  assert straight.returncode == 0, straight.stderr[-2000:]
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(
    [sys.executable, '-c', KILL_IN_SAVE, *MLP_FLAGS, *steps, f'--workdir={workdir}'],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  wait_for(lambda: (workdir / 'in_save').exists(), proc, 'the save of step 6')
  proc.kill()
  proc.wait()
  assert [s for s in os.listdir(workdir / 'checkpoints') if s.isdigit()] == ['3']
  assert glob.glob(str(workdir / 'checkpoints' / '6.orbax-checkpoint-tmp*'))
  rerun = run_mlp(workdir, *steps)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert 'found an interrupted save' in rerun.stderr
  assert os.listdir(workdir / 'checkpoints_incomplete')  # kept, not deleted
  with open(workdir / 'summary.json') as f:
    assert json.load(f)['resumed_from_step'] == 3
  assert_trees_equal(final_params(tmp_path / 'straight'), final_params(workdir))


@pytest.mark.parametrize('damage', ['truncate', 'garble'])
def test_a_corrupted_latest_checkpoint_is_reported_and_skipped(tmp_path, caplog, damage):
  c = tiny_config()
  train.train_and_evaluate(c, str(tmp_path / 'straight'))
  train.train_and_evaluate(c, str(tmp_path / 'hurt'))
  # The largest array file of step 6: a flipped byte there restores silently without checksums.
  files = glob.glob(str(tmp_path / 'hurt' / 'checkpoints' / '6' / 'state' / '**' / 'd' / '*'))
  victim = max(files, key=os.path.getsize)
  with open(victim, 'rb') as f:
    data = bytearray(f.read())
  if damage == 'truncate':
    data = data[: len(data) // 2]
  else:
    data[len(data) // 2] ^= 0x01
  with open(victim, 'wb') as f:
    f.write(data)

  c.total_steps = 9
  summary = train.train_and_evaluate(c, str(tmp_path / 'hurt'))
  assert summary['resumed_from_step'] == 3
  assert 'checkpoint' in caplog.text and 'is bad' in caplog.text
  assert os.path.basename(victim) in caplog.text
  assert os.listdir(tmp_path / 'hurt' / 'checkpoints_corrupt') == ['6']  # kept for inspection
  straight = tiny_config()
  straight.total_steps = 9
  train.train_and_evaluate(straight, str(tmp_path / 'straight'))
  assert_trees_equal(final_params(tmp_path / 'straight'), final_params(tmp_path / 'hurt'))


def test_no_good_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  c = tiny_config()
  c.total_steps = 3
  train.train_and_evaluate(c, str(tmp_path))
  manifest = tmp_path / 'checkpoints' / '3' / 'sha256.json'
  digests = json.loads(manifest.read_text())
  manifest.write_text(json.dumps({k: '0' * 64 for k in digests}))
  with pytest.raises(errors.UserError, match='no readable checkpoint'):
    train.train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == ['3']  # nothing moved: nothing to fall back to


if __name__ == '__main__':
  worker(sys.argv[1], sys.argv[2], [int(f) for f in sys.argv[3].split(',')])
