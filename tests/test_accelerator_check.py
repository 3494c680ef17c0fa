"""benchmarks/accelerator_check.py --smoke: the GPU check's code runs (tiny shapes, CPU) and
writes the JSON and markdown it promises, so the one command a GPU gets cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ['numerics', 'layer', 'train_step', 'resnet']
# About 2 CPU minutes of compiles (a fifth of the default suite's budget): -m slow, like the
# other benchmarks' smallest runs in test_scripts.py.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def smoke(tmp_path_factory) -> tuple[dict, str]:
  out = tmp_path_factory.mktemp('accelerator_check')
  script = os.path.join(REPO, 'benchmarks', 'accelerator_check.py')
  run = subprocess.run(
    # Budgets scaled up: a loaded test machine must not skip cases the test checks.
    [sys.executable, script, '--smoke', '--budget_scale=10', f'--out={out}'],
    capture_output=True,
    text=True,
    timeout=1200,  # about 2 CPU minutes, mostly compiles; a loaded machine takes longer
  )
  assert run.returncode == 0, run.stderr[-3000:]
  with open(out / 'accelerator_check.json') as f:
    results = json.load(f)
  return results, (out / 'accelerator_check.md').read_text()


def rows(results: dict, section: str) -> list[dict]:
  entry = results['sections'][section]
  assert 'error' not in entry, entry.get('traceback', entry['error'])
  return entry['rows']


def test_every_section_ran_without_error(smoke):
  results, _ = smoke
  assert list(results['sections']) == SECTIONS
  assert results['smoke'] is True and results['backend'] == 'cpu'
  for name in SECTIONS:
    for row in rows(results, name):
      if row['case'] != 'the same in PyTorch':  # torch is optional
        assert 'error' not in row and 'skipped' not in row, row


def test_the_interpreted_pallas_kernel_matches_xla(smoke):
  results, _ = smoke
  numerics = rows(results, 'numerics')
  assert {r['dtype'] for r in numerics} == {'float32', 'bfloat16'}
  for r in numerics:
    # float32 to rounding; bfloat16 products rounded to 8 bits of mantissa.
    tol = 1e-5 if r['dtype'] == 'float32' else 2e-2
    for name in ('out', 'dx', 'dvalues'):
      assert 0 <= r[f'{name}_rel_err'] <= tol, (r, name)


def test_layer_and_train_step_rows(smoke):
  results, _ = smoke
  layer = rows(results, 'layer')
  names = [r['case'] for r in layer]
  assert names[0].startswith('dense') and layer[0]['time_over_dense'] == 1.0
  assert any(n.startswith('masked') for n in names)
  assert {'block_sparse xla b=32', 'block_sparse pallas b=32'} <= set(names)
  assert all(r['ms'] > 0 for r in layer)
  steps = rows(results, 'train_step')
  assert [r['case'] for r in steps] == [
    'GPT-3 Small dense',
    'Sparse Wide 0.75 masked',
    'Sparse Wide 0.75 block_sparse b=32',
    'GPT-3 Small dense, dropout 0',
  ]
  for r in steps:
    assert r['step_ms'] > 0 and r['tokens_per_s'] > 0 and r['compiled_bytes'] > 0
    assert r['mfu_vs_spec_peak'] is None  # the CPU has no datasheet peak in the table
    assert r['mfu_vs_measured_matmul'] > 0 and r['time_over_dense'] > 0
  # The paper configs' attention dropout 0.1 keeps the explicit attention; without it, jax's.
  assert [r['attention'].split(' ')[0] for r in steps] == ['explicit'] * 3 + [
    'dot_product_attention'
  ]
  assert steps[0]['time_over_dense'] == 1.0


def test_resnet_row_and_markdown(smoke):
  results, md = smoke
  resnet, torch_row = rows(results, 'resnet')
  assert resnet['case'] == 'ResNet-18 CIFAR-100 width 4, JAX' and resnet['images_per_s'] > 0
  assert torch_row['case'] == 'the same in PyTorch'
  assert 'images_per_s' in torch_row or torch_row['skipped'] == 'torch not importable'
  assert md.startswith(f'# accelerator_check: {results["device"]}')
  for name in SECTIONS:
    assert f'## {name} (' in md
  assert '| block_sparse pallas b=32 |' in md
  assert 'ERROR' not in md
