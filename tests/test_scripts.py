"""The command-line tools, benchmarks and experiment scripts, each run at its smallest settings.

They are subprocess runs of the files as a user starts them, so none can rot silently; the tools
must describe the model the same config trains.
"""

import os
import re
import subprocess
import sys

import jax
import pytest

from sift_jax import config_lib, experiment, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(
  args: list[str], cwd: str = REPO, timeout: float = 600, check: bool = True, **env
) -> subprocess.CompletedProcess:
  """Runs a command with this checkout first on the path; with `check`, asserts exit 0."""
  full_env = {**os.environ, 'PYTHONPATH': REPO, **env}
  out = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
  if check:
    assert out.returncode == 0, f'{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}'
  return out


def python(*args: str, **kw) -> subprocess.CompletedProcess:
  return run([sys.executable, *args], **kw)


def test_flops_cli_describes_the_model_the_trainer_builds(tmp_path):
  """gpt_small_wide:local is a 256-byte vocabulary: 1.7M params, 1.103x forward FLOPs."""
  out = python(
    '-m', 'sift_jax.model_report', '--config=configs/gpt_small_wide.py:local', cwd=tmp_path
  )
  exp = experiment.build_experiment(config_lib.load_config('configs/gpt_small_wide.py', 'local'))
  params = sum(leaf.size for leaf in jax.tree.leaves(exp.abstract_state.params))
  assert f'params: {params:,}' in out.stdout
  ratio = exp.sift_flops.forward / exp.sift_flops.dense_forward
  assert f'forward {ratio:.4f}x' in out.stdout
  assert 1.09 < ratio < 1.11 and params < 2_000_000


@pytest.mark.real_data
def test_flops_cli_sizes_images_by_the_dataset(tmp_path):
  """resnet18_cifar100:local trains on cifar10_jpg: a 10-class head, not 100."""
  from sift_jax import data

  c = config_lib.load_config('configs/resnet18_cifar100.py', 'local')
  out = python(
    '-m', 'sift_jax.model_report', '--config=configs/resnet18_cifar100.py:local', cwd=tmp_path
  )
  meta = data.build_dataset(c).meta
  assert meta['num_classes'] == 10
  assert f'params: {models.count_params(models.build_model(c, meta), c, meta):,}' in out.stdout


def test_report_flags(tmp_path):
  help_out = python('-m', 'sift_jax.sift.report', '--help', cwd=tmp_path, timeout=60, check=False)
  assert '--levels' in help_out.stdout and '|' not in help_out.stdout  # help, not the table
  out = python(
    '-m',
    'sift_jax.sift.report',
    '--config=configs/gpt_small_wide.py:local',
    '--members=wide',
    '--levels=0.5',
    cwd=tmp_path,
  )
  rows = [line for line in out.stdout.splitlines() if line.startswith('| wide')]
  assert [r.split('|')[2].strip() for r in rows] == ['0.5', '0.5']  # plain and match_flops
  assert '| 1.103x |' in rows[0]
  assert re.search(r'^\[ *\d+ s\] gpt wide s=0\.5 \(1/1\)$', out.stderr, flags=re.M)  # progress
  assert re.search(r'dense 0\.84M params', out.stdout)
  bad = python('-m', 'sift_jax.sift.report', '--members=wid', cwd=tmp_path, check=False)
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert 'pick from wide, parallel, factorized, doped' in bad.stderr


TINY_MLP = [
  '--config.total_steps=4',
  '--config.log_every_steps=2',
  '--config.model.hidden=(16,)',
  '--config.data.name=digits',
  '--config.eval.max_examples=64',
  '--config.batch_size=16',
  '--config.progress=false',
]


def test_launcher_relays_the_run_not_the_collectives_chatter(tmp_path):
  from sift_jax import launch

  out = python(
    '-m',
    'sift_jax.launch',
    '--processes=2',
    '--',
    '--config=configs/mlp_fashion_mnist.py:local',
    *[f for f in TINY_MLP if 'progress' not in f],
    f'--workdir={tmp_path / "run"}',
    cwd=tmp_path,
  )
  lines = (out.stdout + out.stderr).strip().splitlines()
  assert '[Gloo]' not in out.stdout + out.stderr
  assert [line.split()[:2] for line in lines] == [
    ['[p0]', 'compiled'],  # the train step's compile time, before the first log step
    ['[p0]', 'step'],
    ['[p0]', 'step'],
  ], lines
  assert (tmp_path / 'run' / 'summary.json').is_file()
  gloo = '[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer ranks is : '
  assert launch.is_chatter(gloo + '3\n') and not launch.is_chatter(gloo + '4\n')
  assert not launch.is_chatter('[Gloo] Rank 1 is NOT connected to: [2]\n')


@pytest.mark.slow  # a study's run.sh: its flags reach every run (the sweeps have their own tests)
def test_mlp_rules_experiment_passes_flags_through(tmp_path):
  out = run(
    ['bash', os.path.join(REPO, 'experiments/mlp_rules/run.sh'), str(tmp_path / 'out'), *TINY_MLP],
    cwd=tmp_path,
    RULES='rigl',
  )
  rows = [
    line
    for line in out.stdout.splitlines()
    if line.startswith('| dense') or line.startswith('| rigl')
  ]
  assert len(rows) == 2, out.stdout
  assert '0.099609' in rows[1]  # rigl at 0.9 of the 16-unit MLP's sparse layers
  with open(tmp_path / 'out' / 'rigl' / 'config.json') as f:
    assert '"total_steps": 4' in f.read()


BENCHMARKS = [
  pytest.param(
    ['step_time.py', '--cases=gpt_local', '--steps=1', '--windows=1', '--batch_size=8'],
    'gpt_local',
    id='step_time',
    marks=pytest.mark.slow,
  ),
  pytest.param(
    ['step_time_conv.py', '--batch=2', '--variants=default', '--repeats=1'],
    'weight_grad',
    id='step_time_conv',
    marks=pytest.mark.slow,
  ),
  pytest.param(
    ['sift_step_time.py', '--models=mlp', '--levels=0.75', '--members=wide', '--steps=1']
    + ['--windows=1', '--batch_size=8', '--executions=masked,block_sparse', '--blocks=64'],
    'block 64',
    id='sift_step_time',
    marks=pytest.mark.slow,
  ),
  pytest.param(
    ['sparsity_overhead.py', '--models=mlp', '--rules=static', '--windows=1', '--sizes=1e4']
    + ['--scale_rules=rigl'],
    'rigl',
    id='sparsity_overhead',
    marks=pytest.mark.slow,
  ),
  pytest.param(
    ['input_pipeline.py', '--workers=1', '--images=4', '--width=64', '--height=48']
    + ['--batch_size=4', '--batches=1', '--warmup=1', '--windows=1'],
    'grain, 1 worker',
    id='input_pipeline',
  ),
  pytest.param(
    ['scaling.py', '--layouts=1,2x1', '--steps=1', '--windows=1'],
    '2x1',
    id='scaling',
    marks=pytest.mark.slow,
  ),
]


@pytest.mark.parametrize('args,expect', BENCHMARKS)
def test_benchmark_runs_at_its_smallest_settings(args, expect, tmp_path):
  out = python(os.path.join(REPO, 'benchmarks', args[0]), *args[1:], cwd=tmp_path)
  assert expect in out.stdout, out.stdout


def test_export_without_a_checkpoint_is_one_line(tmp_path):
  out = python(
    '-m',
    'sift_jax.sparsity.export',
    f'--workdir={tmp_path}',
    f'--out={tmp_path / "x"}',
    cwd=tmp_path,
    check=False,
  )
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert f'no checkpoint under {tmp_path / "checkpoints"}' in out.stderr


def test_checkpoint_tools_take_a_relative_workdir(tmp_path):
  """orbax restores only absolute paths; export and spectral resolve a relative --workdir."""
  import numpy as np
  import orbax.checkpoint as ocp

  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(64, 64)).astype(np.float32)
  mask = rng.random((64, 64)) < 0.25  # average degree 16: spectral scores it
  state = {
    'params': {'Dense_0': {'kernel': kernel}},
    'sparsity': {'masks': {'Dense_0': {'kernel': mask}}},
  }
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'run' / 'checkpoints' / '5' / 'state', state)
  checkpointer.wait_until_finished()
  out = python('-m', 'sift_jax.sparsity.export', '--workdir=run', '--out=csr', cwd=tmp_path)
  assert f'nnz {int(mask.sum())}' in out.stdout and (tmp_path / 'csr').is_dir()
  out = python('-m', 'sift_jax.analysis.spectral', '--workdir=run', cwd=tmp_path)
  assert out.stdout.startswith('step 5:') and 'ramanujan_gap' in out.stdout


@pytest.mark.real_data
@pytest.mark.parametrize(
  'sweep_file',
  sorted(
    os.path.relpath(os.path.join(root, f), REPO)
    for root, _, files in os.walk(os.path.join(REPO, 'experiments'))
    if 'runs' not in root
    for f in files
    if f.startswith('sweep') and f.endswith('.py')
  ),
)
def test_study_sweep_lists_its_runs_with_three_seeds_each(sweep_file):
  out = python('-m', 'sift_jax.sweep', sweep_file, '--dry_run', timeout=120)
  head = out.stdout.splitlines()[0]
  total = int(re.match(r'(\d+) runs:', head).group(1))
  assert total > 0 and ' 0 conflict' in head, head
  names = re.findall(r'^\S+\s+([^\s:]+)(?:: .*)?$', out.stdout, flags=re.M)  # 'done  x: recorded'
  per_seed = [sum(n.endswith(f'seed-{s}') for n in names) for s in range(3)]
  assert per_seed[0] * 3 == total and per_seed == [per_seed[0]] * 3, (sweep_file, per_seed)
