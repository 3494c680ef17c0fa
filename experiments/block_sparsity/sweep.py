"""block_sparsity: what blocking costs in accuracy (issue 11, "Accuracy of blocking").

Sparse Wide at s = 0.75 with RigL on the `local` tinyshakespeare GPT: unstructured masks (b = 1,
masked execution, the papers' method) against balanced block masks of b = 16, 64 and 128 trained
block-sparse (`sparsity.execution=block_sparse`, which makes the masks balanced: the same number
of active blocks in every output block-column), and the dense model; 3 seeds, sift_language's run
length, so its dense and b = 1 runs are the same settings as there.
"""

import os

from sift_jax import sweep

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = [0, 1, 2]


def get_sweep():
  language = sweep.load_sweep(os.path.join(HERE, '..', 'sift_language', 'sweep.py'))['fixed']
  wide = {'sift': 'wide', 'sparsity': 0.75, 'rule': 'rigl'}
  blocked = [
    {**wide, 'sparsity.execution': 'block_sparse', 'sparsity.block_shape': (b, b)}
    for b in (16, 64, 128)
  ]
  return {
    'config': 'configs/gpt_small_dense.py:local',
    'fixed': {'data.name': 'tiny_shakespeare', **language},
    'overrides': [
      {**setting, 'seed': seed} for seed in SEEDS for setting in [{'sift': 'dense'}, wide, *blocked]
    ],
  }
