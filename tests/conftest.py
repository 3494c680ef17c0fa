"""Shared test fixtures: the real-data root, small run configs, reading checkpoints."""

from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data_dir() -> str:
  """The folder of real datasets (../shared/datasets in CI); skips when SIFT_DATA_DIR is unset.

  Under CI (CI=true) a missing data root fails instead, so a green CI always read the real files.
  """
  root = os.environ.get('SIFT_DATA_DIR')
  if not root:
    message = 'SIFT_DATA_DIR is unset: point it at ../shared/datasets to run real-data tests'
    if os.environ.get('CI'):
      pytest.fail(message)
    pytest.skip(message)
  if not os.path.isdir(root):
    pytest.fail(f'SIFT_DATA_DIR={root!r} is not a folder')
  return root
