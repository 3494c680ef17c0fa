"""Preflight (sift_jax/preflight.py): the paper configs' train steps lower for cuda and tpu.

Default suite: the argument errors, the grad_accum_steps search, the command on the MLP (lowering,
CPU-proxy compile, memory search) and over 8 fsdp devices, and the Sparse Wide GPT-3 Small layer
at full width (one block) block-sparse at 128 x 128. `-m slow`: issue 21 item 2's grid, lowering
only: gpt_small_dense / gpt_small_wide at full size (bf16) for every member, level, rule and
execution, the ResNets, the MLP, and one 8-device fsdp case per family.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import ml_collections
import pytest

from sift_jax import config_lib, preflight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLATFORMS = ('cuda', 'tpu')
# The Pallas kernel's custom calls: on tpu Mosaic, on cuda Triton or Mosaic GPU.
KERNEL_CALLS = {'tpu': ('tpu_custom_call',), 'cuda': ('__gpu$xla.gpu.triton', 'mosaic_gpu')}
MLP = 'configs/mlp_fashion_mnist.py'
MLP_PARAMS = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10


def load(spec: str, **overrides) -> ml_collections.ConfigDict:
  """`configs/<file>.py[:arg]` with dotted-key overrides ('sparsity.execution': ...)."""
  path, _, arg = spec.partition(':')
  config = config_lib.load_config(os.path.join(REPO, path), arg or None)
  for key, value in overrides.items():
    *groups, last = key.split('.')
    node = config
    for g in groups:
      node = node[g]
    node[last] = value
  return config


def execution(name: str) -> dict:
  """'masked' or 'block_sparse_<b>' as config overrides."""
  if name == 'masked':
    return {'sparsity.execution': 'masked'}
  b = int(name.rsplit('_', 1)[1])
  return {'sparsity.execution': 'block_sparse', 'sparsity.block_shape': (b, b)}


def lower(config: ml_collections.ConfigDict) -> dict[str, preflight.Lowering]:
  """Each platform's lowering; a block shape that does not tile a kernel skips the case."""
  try:
    _, lowered = preflight.lower_platforms(config, preflight.dataset_meta(config), PLATFORMS)
  except ValueError as e:
    if 'does not tile' in str(e):
      pytest.skip(f'the block shape does not tile this model: {e}')
    raise
  return lowered


def assert_lowers(lowered: dict[str, preflight.Lowering], block_sparse: bool) -> None:
  for p in PLATFORMS:
    assert lowered[p].error is None, f'{p}: {lowered[p].error}'
    if block_sparse:  # the accelerator's kernel, not the CPU's XLA fallback
      text = lowered[p].exported.mlir_module()
      assert any(call in text for call in KERNEL_CALLS[p]), f'{p}: no Pallas kernel lowered'


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, **(env or {})}
  env.pop('XLA_FLAGS', None)  # the command sets the host device count itself
  return subprocess.run(
    [sys.executable, '-m', 'sift_jax.preflight', *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=1800,
  )


# --------------------------------------------------------------------------- arguments


def test_platforms_and_sizes_are_checked():
  assert preflight.parse_platforms('cuda, tpu') == ('cuda', 'tpu')
  with pytest.raises(preflight.PreflightError, match=r"'gpu'.*allowed: cpu, cuda, tpu"):
    preflight.parse_platforms('cuda,gpu')
  assert preflight.parse_bytes('80GiB') == 80 * 2**30
  assert preflight.parse_bytes('16GB') == 16 * 10**9
  assert preflight.parse_bytes('1.5MiB') == 3 * 2**19
  for bad in ('lots', '0GiB', '-1GiB', '80XB', ''):
    with pytest.raises(preflight.PreflightError, match='--device_memory='):
      preflight.parse_bytes(bad)


def test_a_dataset_sized_by_its_data_is_refused():
  config = load('configs/gpt_small_dense.py', **{'data.name': 'tiny_shakespeare'})
  with pytest.raises(preflight.PreflightError, match="'tiny_shakespeare' cannot be sized"):
    preflight.dataset_meta(config)


def test_command_line_errors_are_one_line():
  r = run_cli(f'--config={MLP}', '--platforms=cuda,gpu')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith('error: --platforms=')
  assert 'allowed: cpu, cuda, tpu' in r.stderr


# --------------------------------------------------------------------------- memory search


def fake_footprints(monkeypatch, temp) -> dict[int, int]:
  """preflight.footprint replaced by argument 10 + output 5 - donated 5 + temp(accum)."""
  compiled = {}

  def footprint(exp, accum=None):
    compiled[accum] = compiled.get(accum, 0) + 1
    return preflight.Footprint(10, 5, 5, temp(accum))

  monkeypatch.setattr(preflight, 'footprint', footprint)
  return compiled


def fake_experiment(batch_size: int, devices: int):
  return types.SimpleNamespace(
    config=types.SimpleNamespace(batch_size=batch_size), mesh=types.SimpleNamespace(size=devices)
  )


def test_accum_search_finds_the_smallest_fit_without_large_counts(monkeypatch):
  # Per-device batch 48: candidates 1 2 3 4 6 8 12 16 24 48. Footprint 10 + 1200 / accum.
  compiled = fake_footprints(monkeypatch, lambda a: 1200 // a)
  exp = fake_experiment(96, 2)
  assert preflight.smallest_fitting_accum(exp, 10 + 200, {}) == 6
  assert sorted(compiled) == [1, 2, 4, 6, 8]  # doubling to 8, bisected back; 12+ never built
  assert all(n == 1 for n in compiled.values())
  compiled.clear()
  assert preflight.smallest_fitting_accum(exp, 10 + 1200, {}) == 1
  assert preflight.smallest_fitting_accum(exp, 10 + 25, {}) == 48


def test_accum_search_gives_up_when_accumulation_cannot_help(monkeypatch):
  exp = fake_experiment(64, 1)
  compiled = fake_footprints(monkeypatch, lambda a: 100 // a)
  assert preflight.smallest_fitting_accum(exp, 9, {}) is None  # the state alone: 10 bytes
  assert sorted(compiled) == [1]
  compiled = fake_footprints(monkeypatch, lambda a: 100)  # accumulation does not shrink it
  assert preflight.smallest_fitting_accum(exp, 50, {}) is None
  assert sorted(compiled) == [1, 2]


# --------------------------------------------------------------------------- the command


def test_command_on_the_mlp_lowers_compiles_and_fits():
  r = run_cli(
    f'--config={MLP}:sparsity=0.9,rule=rigl', '--platforms=cuda,tpu', '--device_memory=1GiB'
  )
  assert r.returncode == 0, r.stderr[-2000:]
  out = r.stdout
  assert 'devices: 1 (mesh data 1 x fsdp 1)' in out
  assert re.search(r'^cuda: OK \(lowered in', out, re.M) and re.search(r'^tpu: OK', out, re.M)
  # float32 params of one device; SGD's momentum is one more copy.
  assert f'params {preflight.human(4 * MLP_PARAMS)}, optimizer state' in out
  assert f'optimizer state {preflight.human(4 * MLP_PARAMS)}' in out
  m = re.search(r'CPU proxy \(grad_accum_steps=1\): ([\d.]+) MiB', out)
  assert m and 4 * MLP_PARAMS / 2**20 < float(m.group(1)) < 1024, out
  assert 'fits in 1.00 GiB with optim.grad_accum_steps=1' in out


def test_report_says_why_nothing_fits():
  footprint = preflight.Footprint(
    argument=30 * 2**20, output=18 * 2**20, donated=18 * 2**20, temp=50
  )
  lowered = {p: preflight.Lowering(None, None, 1.0) for p in PLATFORMS}
  report = preflight.Report({'data': 1, 'fsdp': 1}, lowered, {}, 1, footprint, 2**20, None)
  assert not report.ok  # every platform lowers, but nothing fits
  text = preflight.format_report(report)
  assert 'nothing fits in 1.00 MiB: the state and the batch alone take 30.00 MiB' in text
  report = preflight.Report({'data': 1, 'fsdp': 1}, lowered, {}, 1, footprint, 2**30, None)
  assert 'more gradient accumulation stops shrinking' in preflight.format_report(report)
  failed = {**lowered, 'cuda': preflight.Lowering(None, 'ValueError: too big', 1.0)}
  report = preflight.Report({'data': 1, 'fsdp': 1}, failed, {}, 1, footprint, None, None)
  assert not report.ok and 'cuda: FAILED: ValueError: too big' in preflight.format_report(report)


def test_eight_fsdp_devices_shard_the_state():
  r = run_cli(
    f'--config={MLP}:sparsity=0.9,rule=rigl',
    '--platforms=cuda,tpu',
    '--devices=8',
    '--config.mesh.fsdp=8',
    '--nocompile',
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'devices: 8 (mesh data 1 x fsdp 8)' in r.stdout
  assert re.search(r'^cuda: OK', r.stdout, re.M) and re.search(r'^tpu: OK', r.stdout, re.M)
  # The two large kernels are split 8 ways; biases and the 10-way head stay whole.
  sharded = (784 * 1024 + 1024 * 1024) // 8 + 1024 + 1024 + 1024 * 10 + 10
  assert f'params {preflight.human(4 * sharded)},' in r.stdout


def test_sparse_wide_gpt_layer_lowers_block_sparse_at_128():
  """GPT-3 Small Sparse Wide at s = 0.75 (1536 x 6144 kernels), one block, 128 x 128 blocks."""
  config = load(
    'configs/gpt_small_wide.py:sparsity=0.75,rule=rigl',
    **execution('block_sparse_128'),
    **{'model.num_layers': 1},
  )
  lowered = lower(config)
  assert_lowers(lowered, block_sparse=True)
  for p in PLATFORMS:  # one program: RigL's mask update is its lax.cond branch
    assert 'stablehlo.case' in lowered[p].exported.mlir_module()


# --------------------------------------------------------------------------- the grid (-m slow)

GPT_MEMBERS = ('dense', 'wide', 'parallel', 'factorized', 'doped')
LEVELS = (0.75, 0.5, 0.9)  # the headline level first
RULES = ('rigl', 'topkast', 'gse')
EXECUTIONS = ('block_sparse_128', 'block_sparse_64', 'masked')


def gpt_spec(member: str, level: float, rule: str) -> str:
  """gpt_small_wide.py for Sparse Wide, gpt_small_dense.py for the others (no member: dense)."""
  if member == 'wide':
    return f'configs/gpt_small_wide.py:sparsity={level},rule={rule}'
  sift = '' if member == 'dense' else f'sift={member},'
  return f'configs/gpt_small_dense.py:{sift}sparsity={level},rule={rule}'


# Every member at one setting before the next (the topmost parameter varies fastest), so a
# partial run of the grid covers the members evenly.
@pytest.mark.slow
@pytest.mark.parametrize('member', GPT_MEMBERS)
@pytest.mark.parametrize('mode', EXECUTIONS)
@pytest.mark.parametrize('rule', RULES)
@pytest.mark.parametrize('level', LEVELS)
def test_gpt_small_lowers(member, level, rule, mode):
  config = load(gpt_spec(member, level, rule), **execution(mode))
  assert config.model.dtype == 'bfloat16' and config.batch_size == 512
  assert_lowers(lower(config), block_sparse=mode != 'masked')


RESNETS = ('resnet18_cifar100', 'resnet18_imagenet', 'resnet34_imagenet')
RESNET_CASES = (
  *(f'sift={m},sparsity=0.9,rule=rigl' for m in ('wide', 'parallel', 'factorized', 'doped')),
  'sparsity=0.9,rule=topkast',
  'sparsity=0.9,rule=gse',
)


@pytest.mark.slow
@pytest.mark.parametrize('arg', RESNET_CASES)
@pytest.mark.parametrize('name', RESNETS)
def test_resnets_lower_masked(name, arg):
  config = load(f'configs/{name}.py:{arg}')
  assert config.sparsity.execution == 'masked'
  assert_lowers(lower(config), block_sparse=False)


@pytest.mark.slow
@pytest.mark.parametrize('rule', RULES)
def test_mlp_lowers(rule):
  assert_lowers(lower(load(f'{MLP}:sift=wide,sparsity=0.9,rule={rule}')), block_sparse=False)


FSDP_CASES = {
  'gpt': (
    'configs/gpt_small_wide.py:sparsity=0.75,rule=rigl',
    '--config.sparsity.execution=block_sparse',
    '--config.sparsity.block_shape=(128,128)',
  ),
  'resnet': ('configs/resnet18_imagenet.py:sift=wide,sparsity=0.9,rule=rigl',),
  'mlp': (f'{MLP}:sift=wide,sparsity=0.9,rule=gse',),
}


# Measured: GSPMD cannot partition a Mosaic (TPU) custom call, so the block-sparse kernel over a
# sharded batch needs a shard_map around it (sparse_layers), which it does not have yet.
MOSAIC_UNPARTITIONED = pytest.mark.xfail(
  strict=False,
  reason='tpu: "Mosaic kernels cannot be automatically partitioned. Please wrap the call in a '
  'shard_map." (block_sparse over 8 devices)',
)


@pytest.mark.slow
@pytest.mark.parametrize(
  'family', [pytest.param('gpt', marks=MOSAIC_UNPARTITIONED), 'resnet', 'mlp']
)
def test_eight_fsdp_devices_per_family(family):
  spec, *overrides = FSDP_CASES[family]
  r = run_cli(
    f'--config={spec}',
    *overrides,
    '--platforms=cuda,tpu',
    '--devices=8',
    '--config.mesh.fsdp=8',
    '--nocompile',
  )
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  assert 'devices: 8 (mesh data 1 x fsdp 8)' in r.stdout
  assert re.search(r'^cuda: OK', r.stdout, re.M) and re.search(r'^tpu: OK', r.stdout, re.M)
