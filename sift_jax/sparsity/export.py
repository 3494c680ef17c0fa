"""Export: bake the masks into the weights and write each sparse layer as a scipy CSR matrix."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import scipy.sparse

from sift_jax.sparsity.execution import BlockState, PrefixBlockState, unpack_state
from sift_jax.sparsity.plan import path_of


def export_sparse(params: Any, masks: Any, path: str) -> dict[str, dict[str, Any]]:
  """Writes every masked leaf to `path`/<name>.npz as CSR and an index.json; returns the index.

  A kernel of shape (..., O) is stored as a (prod(...), O) CSR matrix of the masked weights,
  with its original shape and density in index.json (name -> file, shape, nnz, density).
  Explicit entries are the mask's active positions, so a trained weight that happens to be
  0.0 is kept as an explicit entry.
  """
  params = jax.device_get(params)
  masks = jax.device_get(masks)
  p_leaves = jax.tree.leaves(params)
  m_flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  if len(m_flat) != len(p_leaves):
    raise ValueError(f'masks have {len(m_flat)} leaves but params have {len(p_leaves)}')
  os.makedirs(path, exist_ok=True)
  index = {}
  for (kp, m), p in zip(m_flat, p_leaves, strict=True):
    if m is None:
      continue
    name = '/'.join(path_of(kp))
    w = np.asarray(p, np.float32).reshape(-1, p.shape[-1])  # (prod(...), O)
    mask = np.asarray(m, bool).reshape(w.shape)
    rows, cols = np.nonzero(mask)
    csr = scipy.sparse.csr_matrix((w[rows, cols], (rows, cols)), shape=w.shape)
    file = name.replace('/', '.') + '.npz'
    scipy.sparse.save_npz(os.path.join(path, file), csr)
    index[name] = {
      'file': file,
      'shape': list(p.shape),
      'nnz': int(mask.sum()),
      'density': float(mask.mean()),
    }
  with open(os.path.join(path, 'index.json'), 'w') as f:
    json.dump(index, f, indent=1)
  return index


def load_sparse(path: str) -> dict[str, np.ndarray]:
  """Reads an export back as dense arrays of the original shapes (masked entries 0)."""
  with open(os.path.join(path, 'index.json')) as f:
    index = json.load(f)
  return {
    name: scipy.sparse.load_npz(os.path.join(path, e['file'])).toarray().reshape(e['shape'])
    for name, e in index.items()
  }


def export_checkpoint(workdir: str, out: str, step: int | None = None) -> dict[str, dict[str, Any]]:
  """Exports the sparse layers of a run's checkpoint (the latest unless `step` is given)."""
  import orbax.checkpoint as ocp

  # orbax restores only from absolute paths; a relative --workdir is the usual command line.
  root = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise FileNotFoundError(f'no checkpoint under {root}')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f'no checkpoint at step {step} in {root}; saved steps: {steps}')
  state = ocp.StandardCheckpointer().restore(os.path.join(root, str(step), 'state'))
  sstate = state['sparsity']
  if 'rows' in sstate:
    return export_sparse(*to_masked(state['params'], sstate), out)
  return export_sparse(state['params'], sstate['masks'], out)


def to_masked(params: Any, sstate: dict[str, Any]) -> tuple[Any, Any]:
  """Block-sparse checkpoint state (sparsity.execution=block_sparse) -> (dense params, masks).

  The dense kernel shapes are those of the state's 'ever' masks, which stay dense in either mode;
  the block shape is the stored blocks' (C, K, bi, bo); Top-KAST's A is its 'forward_blocks'.
  """
  none = lambda x: x is None
  sstate = (PrefixBlockState if 'theta' in sstate else BlockState)(**sstate)
  shapes = jax.tree.map(lambda p, r, e: p if r is None else e, params, sstate.rows, sstate.ever)
  flat = zip(jax.tree.leaves(params), jax.tree.leaves(sstate.rows, is_leaf=none), strict=True)
  stored = [p for p, r in flat if r is not None]
  block = tuple(stored[0].shape[2:]) if stored else (1, 1)
  forward = None
  if isinstance(sstate, PrefixBlockState):
    forward = jax.tree.map(int, sstate.forward_blocks)
  masked, params = unpack_state(sstate, params, shapes, block, forward)[:2]
  return params, masked.masks


def _main(argv: list[str]) -> None:
  from sift_jax import config_lib

  del argv
  try:
    index = export_checkpoint(_WORKDIR.value, _OUT.value, _STEP.value)
  except (FileNotFoundError, ValueError) as e:  # no checkpoint, or not at that step
    config_lib.fail(str(e))
  for name, entry in index.items():
    print(f'{name}: {entry["shape"]} nnz {entry["nnz"]} density {entry["density"]:.4f}')
  print(f'wrote {len(index)} sparse layers to {_OUT.value}')


if __name__ == '__main__':
  from absl import app, flags

  _WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder holding checkpoints/.', required=True)
  _OUT = flags.DEFINE_string('out', None, 'Folder to write the CSR files into.', required=True)
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  app.run(_main)
