"""Spectral metrics of sparse masks as bipartite graphs (docs/methods.md section 4, Ramanujan graphs).

A sparse kernel of shape (..., D_out) is the bipartite graph of its mask: left nodes are the
prod(...) inputs (C_in*kh*kw for a conv), right nodes the D_out outputs, edges the active
weights; nodes of degree zero are removed. Its biadjacency matrix B (left x right) gives the
adjacency spectrum directly: the eigenvalues of [[0, B], [B^T, 0]] are +-sigma_i(B) (and zeros),
so the second-largest |eigenvalue| besides the trivial pair +-sigma_1 is sigma_2(B), found with
scipy's sparse SVD (svds) without forming the (left + right)^2 adjacency.

Per layer, with dL, dR the average left and right degrees (both must be >= 3, else the layer
is skipped and the reason logged):
- ramanujan_gap = sqrt(dL - 1) + sqrt(dR - 1) - sigma_2(B)  (>= 0: Ramanujan-like expansion);
- weighted_gap = sigma_1(|W| o B) - sigma_2(|W| o B);
- im_ramanujan_gap, im_weighted_gap (iterative mean): the same scores averaged over the
  d-left-regular sub-graphs made by grouping left nodes of equal degree (each group with the
  right nodes it reaches), over the groups whose own degrees are >= 3.

`python -m sift_jax.analysis.spectral --workdir=runs/<run> [--step=N | --all_steps]` computes
them from a run's checkpoints; with `analysis.spectral=True` the trainer logs them on eval steps.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from absl import logging

from sift_jax.sparsity.plan import path_of

MIN_DEGREE = 3  # docs/methods.md: the scores are computed only where both average degrees are >= 3
DENSE_SVD_BELOW = 64  # smaller sides: a dense eigensolve (ARPACK needs k < min(shape))
SCORES = ('ramanujan_gap', 'weighted_gap', 'im_ramanujan_gap', 'im_weighted_gap')


def biadjacency(mask: np.ndarray, weights: np.ndarray | None = None) -> scipy.sparse.csr_matrix:
  """The (left, right) biadjacency of a kernel's mask, zero-degree nodes removed.

  Entries are 1 (or |weight| when `weights` is given) at the active positions.
  """
  mask = np.asarray(mask, bool).reshape(-1, mask.shape[-1])  # (D_in, D_out)
  rows, cols = np.nonzero(mask)
  values = (
    np.ones(len(rows))
    if weights is None
    else np.abs(np.asarray(weights, np.float64).reshape(mask.shape)[rows, cols])
  )
  b = scipy.sparse.csr_matrix((values, (rows, cols)), shape=mask.shape)
  return b[np.unique(rows)][:, np.unique(cols)]


def top_singular_values(b: scipy.sparse.spmatrix, k: int = 2) -> np.ndarray:
  """The k largest singular values of a sparse matrix, descending (zeros past its size)."""
  n = min(b.shape)
  if n == 0:
    return np.zeros(k)
  if n < DENSE_SVD_BELOW or k >= n:
    # The small side's Gram matrix: an n x n eigenproblem (LAPACK's SVD of a wide 50 x 1000
    # block took 0.2 s here). sigma^2 is exact to ~1e-15 relative; sigma near 0 to ~1e-7.
    gram = (b @ b.T if b.shape[0] == n else b.T @ b).toarray()  # (n, n)
    s = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))
  else:
    # A fixed random start vector: reruns give the same numbers, and unlike all-ones it is not
    # the top singular vector of a regular graph (a Krylov start on an eigenvector stalls).
    v0 = np.random.default_rng(0).standard_normal(n)
    s = scipy.sparse.linalg.svds(b.astype(np.float64), k=k, v0=v0, return_singular_vectors=False)
  s = np.sort(np.abs(s))[::-1][:k]
  return np.pad(s, (0, k - len(s)))


def average_degrees(b: scipy.sparse.spmatrix) -> tuple[float, float]:
  """(dL, dR): edges over left nodes and over right nodes."""
  return b.nnz / b.shape[0], b.nnz / b.shape[1]


def scores(unweighted: scipy.sparse.spmatrix, weighted: scipy.sparse.spmatrix) -> dict[str, float]:
  """Ramanujan gap of the graph and spectral gap of its |W|-weighted version."""
  d_left, d_right = average_degrees(unweighted)
  mu_hat = top_singular_values(unweighted)[1]
  mu0_w, mu_hat_w = top_singular_values(weighted)
  return {
    'ramanujan_gap': math.sqrt(d_left - 1) + math.sqrt(d_right - 1) - mu_hat,
    'weighted_gap': mu0_w - mu_hat_w,
  }


def too_sparse(b: scipy.sparse.spmatrix) -> str | None:
  """Why a graph gets no score (average degree under MIN_DEGREE), or None."""
  if b.nnz == 0:
    return 'no active weights'
  d_left, d_right = average_degrees(b)
  if min(d_left, d_right) < MIN_DEGREE:
    return f'average degrees {d_left:.2f} (left), {d_right:.2f} (right) below {MIN_DEGREE}'
  return None


def layer_spectrum(mask: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
  """The four scores of one sparse kernel, or {'skipped': reason}."""
  b = biadjacency(mask)
  reason = too_sparse(b)
  if reason:
    return {'skipped': reason}
  w = biadjacency(mask, weights)
  out = scores(b, w)
  d_left, d_right = average_degrees(b)
  out.update(left=b.shape[0], right=b.shape[1], d_left=d_left, d_right=d_right)
  # Iterative mean over the d-left-regular sub-graphs (left nodes grouped by degree).
  degrees = np.diff(b.indptr)  # (left,)
  groups = []
  for d in np.unique(degrees):
    rows = np.nonzero(degrees == d)[0]
    sub, sub_w = b[rows], w[rows]
    cols = np.unique(sub.indices)
    sub, sub_w = sub[:, cols], sub_w[:, cols]
    if too_sparse(sub) is None:
      groups.append(scores(sub, sub_w))
  out['groups'] = len(groups)
  for key in ('ramanujan_gap', 'weighted_gap'):
    out[f'im_{key}'] = float(np.mean([g[key] for g in groups])) if groups else math.nan
  return out


def sparse_layers(params: Any, masks: Any) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(path, mask, weight) of every masked leaf; masks are params-shaped with None for dense."""
  m_flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  p_leaves = jax.tree.leaves(params)
  if len(m_flat) != len(p_leaves):
    raise ValueError(f'masks have {len(m_flat)} leaves but params have {len(p_leaves)}')
  return [
    ('/'.join(path_of(kp)), np.asarray(m), np.asarray(p))
    for (kp, m), p in zip(m_flat, p_leaves, strict=True)
    if m is not None
  ]


def spectral_metrics(params: Any, masks: Any) -> tuple[dict[str, float], dict[str, str]]:
  """Metrics `spectral/<score>/<path>` per sparse layer plus `spectral/<score>` (mean over the
  scored layers), and the skipped layers with their reasons."""
  metrics, skipped, per_score = {}, {}, {k: [] for k in SCORES}
  for path, mask, weight in sparse_layers(params, masks):
    result = layer_spectrum(mask, weight)
    if 'skipped' in result:
      skipped[path] = result['skipped']
      continue
    for k in SCORES:
      metrics[f'spectral/{k}/{path}'] = result[k]
      if math.isfinite(result[k]):
        per_score[k].append(result[k])
  for k, values in per_score.items():
    if values:
      metrics[f'spectral/{k}'] = float(np.mean(values))
  return metrics, skipped


_REPORTED: set[tuple[str, str]] = set()


def state_metrics(state: Any) -> dict[str, float]:
  """The trainer's hook (eval steps, `analysis.spectral=True`): metrics of a TrainState's masks
  and weights; skipped layers are logged once per run, not on every eval."""
  from sift_jax import sharding, sparsity

  params = sharding.fetch(state.params)
  masks = sharding.fetch(sparsity.masks_of(state.sparsity))
  if jax.process_index() != 0:  # every process joins the gather; one computes
    return {}
  metrics, skipped = spectral_metrics(params, masks)
  for path, reason in skipped.items():
    if (path, reason) not in _REPORTED:
      _REPORTED.add((path, reason))
      logging.warning('spectral metrics: layer %s skipped: %s', path, reason)
  return metrics


def checkpoint_metrics(
  workdir: str, step: int | None = None, all_steps: bool = False
) -> dict[int, dict[str, Any]]:
  """Metrics of a run's checkpoint(s): {step: {metrics..., 'skipped': {path: reason}}}.

  The latest checkpoint unless `step` or `all_steps` is given. Restores the saved trees as they
  are (no model or data is built), so it works on any workdir the trainer wrote.
  """
  import orbax.checkpoint as ocp

  # orbax restores only from absolute paths; a relative --workdir is the usual command line.
  root = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise FileNotFoundError(f'no checkpoint under {root}')
  if step is not None and step not in steps:
    raise ValueError(f'no checkpoint at step {step} in {root}; saved steps: {steps}')
  out = {}
  for s in steps if all_steps else [steps[-1] if step is None else step]:
    state = ocp.StandardCheckpointer().restore(os.path.join(root, str(s), 'state'))
    metrics, skipped = spectral_metrics(state['params'], state['sparsity']['masks'])
    out[s] = {**metrics, 'skipped': skipped}
  return out


def _main(argv: list[str]) -> None:
  del argv
  try:
    results = checkpoint_metrics(_WORKDIR.value, _STEP.value, _ALL.value)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  for s, metrics in results.items():
    print(f'step {s}:')
    for name, value in metrics.items():
      if name != 'skipped':
        print(f'  {name}: {value:.4f}')
    for path, reason in metrics['skipped'].items():
      print(f'  skipped {path}: {reason}')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({str(s): m for s, m in results.items()}, f, indent=1)


if __name__ == '__main__':
  from absl import app, flags

  _WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder holding checkpoints/.', required=True)
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  _ALL = flags.DEFINE_bool('all_steps', False, 'Every kept checkpoint, not just the latest.')
  _OUT = flags.DEFINE_string('out', None, 'Also write the metrics to this JSON file.')
  app.run(_main)
