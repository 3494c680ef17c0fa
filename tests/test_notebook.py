"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel, as a researcher would run it."""

from __future__ import annotations

import os
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'quickstart.ipynb')


def test_the_notebook_is_committed_without_outputs():
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_the_notebook_needs_no_source_checkout():
  """It runs from an installed package: no path into a checkout (configs ship in the package)."""
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  for checkout_only in ('__file__', 'parents[', 'experiments/', 'REPO', 'cwd=REPO'):
    assert checkout_only not in code


@pytest.mark.slow  # 34 CPU-seconds; what it calls (trainer, sweep, report) is tested by default
def test_the_quickstart_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  # The kernel imports this checkout's sift_jax, whatever is installed.
  monkeypatch.setenv(
    'PYTHONPATH', os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')]))
  )
  monkeypatch.setenv('TMPDIR', str(tmp_path))  # the notebook's temp folders land here
  nb = nbformat.read(NOTEBOOK, as_version=4)
  start = time.monotonic()
  nbclient.NotebookClient(
    nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  ).execute()
  print(f'notebook: {time.monotonic() - start:.1f} s')  # under a minute on a quiet 2-core CPU
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
  assert 'parallel (x4)' in text and '(1.000x dense)' in text
  assert 'sweep finished: 2/2 done, 0 failed' in text
  images = [
    o
    for c in nb.cells
    if c.cell_type == 'code'
    for o in c.outputs
    if 'image/png' in o.get('data', {})
  ]
  assert len(images) >= 3  # loss + densities, results bar chart, the report's curve plot
