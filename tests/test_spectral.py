"""Spectral metrics of masks against graphs with known spectra, and the trainer's hook."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import scipy.linalg

from sift_jax.analysis import spectral

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def adjacency_spectrum(b: np.ndarray) -> np.ndarray:
  """NumPy reference: eigenvalues of the full (left + right) bipartite adjacency, descending."""
  m, n = b.shape
  a = np.block([[np.zeros((m, m)), b], [b.T, np.zeros((n, n))]])
  return np.sort(np.linalg.eigvalsh(a))[::-1]


def regular_bipartite(n: int, d: int, seed: int) -> np.ndarray:
  """A random d-regular bipartite graph on n + n nodes: d edge-disjoint random matchings."""
  rng = np.random.default_rng(seed)
  m = np.zeros((n, n), bool)
  for _ in range(d):
    while True:
      p = rng.permutation(n)
      if not m[np.arange(n), p].any():
        break
    m[np.arange(n), p] = True
  return m


def cycles(length: int, count: int) -> np.ndarray:
  """`count` disjoint cycles C_(2 length): left i joins right i and i + 1 (mod length)."""
  one = np.zeros((length, length), bool)
  one[np.arange(length), np.arange(length)] = True
  one[np.arange(length), (np.arange(length) + 1) % length] = True
  return scipy.linalg.block_diag(*[one] * count)


@pytest.mark.parametrize('m, n', [(7, 11), (67, 71)])  # dense eigensolve and ARPACK paths
def test_complete_bipartite_has_eigenvalues_plus_minus_sqrt_mn_and_zero(m, n):
  b = np.ones((m, n), bool)
  spectrum = adjacency_spectrum(b.astype(float))
  np.testing.assert_allclose(spectrum[[0, -1]], [math.sqrt(m * n), -math.sqrt(m * n)])
  np.testing.assert_allclose(spectrum[1:-1], 0, atol=1e-9)
  top = spectral.top_singular_values(spectral.biadjacency(b))
  np.testing.assert_allclose(top, [math.sqrt(m * n), 0], atol=1e-6)
  # Rank-one weights u v^T: sigma_1 = |u| |v|, sigma_2 = 0, so the weighted gap is |u| |v|.
  u, v = np.arange(1, m + 1.0), np.linspace(-2, 3, n) + 0.1
  result = spectral.layer_spectrum(b, np.outer(u, v))
  # (sigma_2 = 0 comes out as about sqrt(eps) * sigma_1 from the small side's Gram matrix.)
  assert result['weighted_gap'] == pytest.approx(np.linalg.norm(u) * np.linalg.norm(v), abs=1e-5)
  assert result['ramanujan_gap'] == pytest.approx(math.sqrt(n - 1) + math.sqrt(m - 1), abs=1e-6)
  assert (result['d_left'], result['d_right'], result['groups']) == (n, m, 1)
  assert result['im_ramanujan_gap'] == pytest.approx(result['ramanujan_gap'])


def test_disjoint_cycles_have_sigma_two_and_are_skipped_for_degree_two():
  b = cycles(13, 7)  # 91 + 91 nodes: the ARPACK path
  spectrum = adjacency_spectrum(b.astype(float))
  k = np.arange(13)
  one_cycle = np.sort(np.concatenate([2 * np.cos(np.pi * k / 13), -2 * np.cos(np.pi * k / 13)]))
  np.testing.assert_allclose(spectrum, np.sort(np.tile(one_cycle, 7))[::-1], atol=1e-9)
  np.testing.assert_allclose(spectral.top_singular_values(spectral.biadjacency(b)), [2, 2])
  assert spectral.layer_spectrum(b, np.ones(b.shape)) == {
    'skipped': 'average degrees 2.00 (left), 2.00 (right) below 3'
  }


def test_disjoint_complete_graphs_are_not_ramanujan():
  b = scipy.linalg.block_diag(*[np.ones((3, 3), bool)] * 5)  # 5 x K_{3,3}: sigma = 3, 3
  result = spectral.layer_spectrum(b, np.ones(b.shape))
  assert result['ramanujan_gap'] == pytest.approx(2 * math.sqrt(2) - 3)  # negative
  assert result['weighted_gap'] == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize('n, d, seed', [(211, 5, 0), (307, 7, 1), (101, 4, 2)])
def test_random_regular_bipartite_graphs_meet_the_ramanujan_bound(n, d, seed):
  b = regular_bipartite(n, d, seed)
  reference = np.linalg.svd(b.astype(float), compute_uv=False)[:2]
  top = spectral.top_singular_values(spectral.biadjacency(b))
  np.testing.assert_allclose(top, reference, rtol=1e-9)
  assert top[0] == pytest.approx(d)  # the trivial eigenvalue of a d-regular graph
  result = spectral.layer_spectrum(b, np.ones(b.shape))
  bound = 2 * math.sqrt(d - 1)
  assert result['ramanujan_gap'] == pytest.approx(bound - top[1])
  # Random regular bipartite graphs are nearly Ramanujan (Marcus-Spielman-Srivastava; Friedman):
  # sigma_2 sits just under 2 sqrt(d - 1), far below the trivial d.
  assert -0.05 < result['ramanujan_gap'] < 0.35, (top, bound)


def test_iterative_mean_averages_the_left_degree_groups():
  # K_{5,4} beside K_{3,7}: left degrees 4 (five nodes) and 7 (three nodes).
  b = scipy.linalg.block_diag(np.ones((5, 4), bool), np.ones((3, 7), bool))
  w = np.where(b, 2.0, 0.0)
  result = spectral.layer_spectrum(b, w)
  assert result['groups'] == 2
  gaps = [math.sqrt(4 - 1) + math.sqrt(5 - 1), math.sqrt(7 - 1) + math.sqrt(3 - 1)]
  assert result['im_ramanujan_gap'] == pytest.approx(np.mean(gaps), abs=1e-6)
  assert result['im_weighted_gap'] == pytest.approx(np.mean([2 * math.sqrt(20), 2 * math.sqrt(21)]))
  # The whole graph: sigma_1, sigma_2 = sqrt(21), sqrt(20); degrees 41/8 and 41/11.
  whole = math.sqrt(41 / 8 - 1) + math.sqrt(41 / 11 - 1) - math.sqrt(20)
  assert result['ramanujan_gap'] == pytest.approx(whole, abs=1e-6)
  assert result['weighted_gap'] == pytest.approx(2 * (math.sqrt(21) - math.sqrt(20)))


def test_a_conv_is_the_graph_of_its_inputs_times_taps_and_drops_zero_degree_nodes():
  mask = np.ones((3, 3, 5, 7), bool)  # (kh, kw, C_in, C_out)
  mask[:, :, 2, :] = False  # input channel 2 unused: 9 left nodes of degree 0
  mask[..., 4] = False  # output 4 unused
  b = spectral.biadjacency(mask)
  assert b.shape == (36, 6)
  result = spectral.layer_spectrum(mask, np.ones(mask.shape))
  assert (result['left'], result['right']) == (36, 6)
  assert result['ramanujan_gap'] == pytest.approx(math.sqrt(6 - 1) + math.sqrt(36 - 1), abs=1e-6)


def test_metrics_name_every_scored_layer_and_report_skipped_ones():
  params = {
    'a': {'kernel': np.ones((7, 11)), 'bias': np.zeros(11)},
    'b': {'kernel': np.ones((26, 26))},
  }
  masks = {'a': {'kernel': np.ones((7, 11), bool), 'bias': None}, 'b': {'kernel': cycles(13, 2)}}
  metrics, skipped = spectral.spectral_metrics(params, masks)
  assert skipped == {'b/kernel': 'average degrees 2.00 (left), 2.00 (right) below 3'}
  assert set(metrics) == {
    *(f'spectral/{k}/a/kernel' for k in spectral.SCORES),
    *(f'spectral/{k}' for k in spectral.SCORES),
  }
  assert metrics['spectral/weighted_gap'] == pytest.approx(math.sqrt(77))


def test_the_trainer_logs_them_on_eval_steps_and_a_checkpoint_gives_the_same(tmp_path):
  from sift_jax import config_lib, train

  c = config_lib.load_config(os.path.join(REPO, 'configs/mlp_fashion_mnist.py'), 'local')
  c.update(total_steps=6, log_every_steps=2, eval_every_steps=3, checkpoint_every_steps=3)
  c.update(batch_size=16, progress=False)
  c.data.name, c.model.hidden, c.eval.max_examples = 'digits', (32, 16), 64
  c.sparsity.update(rule='rigl', level=0.5, update_every_steps=2)
  c.analysis.spectral = True
  train.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  logged = {r['step']: r for r in rows if 'spectral/ramanujan_gap' in r}
  assert sorted(logged) == [3, 6]  # eval steps only
  for path in ('hidden_0/kernel', 'hidden_1/kernel'):  # 64 x 32 and 32 x 16 at density 0.5
    assert math.isfinite(logged[6][f'spectral/ramanujan_gap/{path}'])
  saved = spectral.checkpoint_metrics(str(tmp_path))
  assert list(saved) == [6]
  for name, value in saved[6].items():
    if name != 'skipped':
      assert value == pytest.approx(logged[6][name], rel=1e-9), name
  assert spectral.checkpoint_metrics(str(tmp_path), all_steps=True).keys() == {3, 6}
  with pytest.raises(ValueError, match=r'no checkpoint at step 4 .*saved steps: \[3, 6\]'):
    spectral.checkpoint_metrics(str(tmp_path), step=4)
