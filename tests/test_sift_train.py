"""Every Sparse-IFT member builds, trains a few steps with a sparsity rule and keeps its masks exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train import final_params, tiny_config

from sift_jax import experiment, models, train
from sift_jax.models.layers import sparse_kernel_paths


def leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


# Two MLP cases (seconds to compile) in the default suite; every member in the slow one.
CASES = [('mlp', 'parallel', 'set')]
SLOW_CASES = [
  ('mlp', 'factorized', 'rigl'),
  ('mlp', 'wide', 'rigl'),
  ('mlp', 'doped', 'set'),
  ('resnet', 'wide', 'rigl'),
  ('resnet', 'parallel', 'rigl'),
  ('resnet', 'factorized', 'set'),
  ('resnet', 'doped', 'static'),
  ('gpt', 'wide', 'static'),
  ('gpt', 'parallel', 'set'),
  ('gpt', 'factorized', 'rigl'),
  ('gpt', 'doped', 'rigl'),
]


@pytest.mark.parametrize(
  'family,member,rule',
  CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES],
)
def test_member_trains_and_keeps_masks_exact(tmp_path, family, member, rule):
  level = 0.75
  c = tiny_config(family, f'local,sift={member},sparsity={level},rule={rule}')
  c.sparsity.update_every_steps = 2
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(summary['train/loss'])

  meta = experiment.build_experiment(c).meta
  variables = models.abstract_variables(models.build_model(c, meta), c, meta)
  paths = sparse_kernel_paths(variables)
  densities = summary['sparsity/layer_density']
  assert sorted(densities) == sorted('/'.join(p) for p in paths)
  params = final_params(str(tmp_path))
  for path in paths:
    n = int(np.prod(leaf(variables['params'], path).shape))  # a ShapeDtypeStruct
    active = round((1 - level) * n)
    assert densities['/'.join(path)] == pytest.approx(active / n, abs=1e-9)
    # Masked weights are exactly zero (regrown ones may be zero too).
    assert np.count_nonzero(np.asarray(leaf(params, path))) <= active
  with open(tmp_path / 'summary.json') as f:
    assert json.load(f)['flops/forward_per_example'] == pytest.approx(
      summary['flops/forward_per_example']
    )
