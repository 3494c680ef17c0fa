"""Shared test fixtures: the real-data root, small run configs, reading checkpoints."""

from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_runtest_setup(item: pytest.Item) -> None:
  """Tests marked real_data read the files under $SIFT_DATA_DIR (../shared/datasets in CI).

  Without it they skip with the reason; under CI (CI=true) they fail instead, so a green CI
  always read the real files.
  """
  if item.get_closest_marker('real_data') is None:
    return
  root = os.environ.get('SIFT_DATA_DIR')
  if not root:
    message = 'SIFT_DATA_DIR is unset: point it at ../shared/datasets to run real-data tests'
    if os.environ.get('CI'):
      pytest.fail(message)
    pytest.skip(message)
  if not os.path.isdir(root):
    pytest.fail(f'SIFT_DATA_DIR={root!r} is not a folder')
