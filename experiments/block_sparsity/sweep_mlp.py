"""block_sparsity on the Fashion-MNIST MLP: what blocking costs in accuracy, at CPU-study cost.

The GPT design (sweep.py) costs tens of CPU hours here; this is the same question on the
784-1024-1024-10 MLP (`mlp_fashion_mnist.py:local`, 1,500 steps as in sift_vision): dense, and
Sparse Wide at s = 0.75 with RigL (hidden 2,048; the sparse kernels are 784 x 2,048 and
2,048 x 2,048, the classifier stays dense) with unstructured masks (b = 1, masked execution)
against balanced block masks trained block-sparse, 3 seeds. The 784-wide input admits no square
block above 16, so the blocks are 16 rows by b = 16, 64, 128 columns (256, 1,024 and 2,048
weights: K = 12 of 49 and 32 of 128 row-blocks per block-column, a quarter).
"""

STEPS = 1_500  # sift_vision's length (the dense MLP's eval loss moves 1.0% over the last fifth)


def get_sweep():
  wide = {'sift': 'wide', 'sparsity': 0.75, 'rule': 'rigl'}
  blocked = [
    {**wide, 'sparsity.execution': 'block_sparse', 'sparsity.block_shape': (16, b)}
    for b in (16, 64, 128)
  ]
  return {
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10},
    'runs_dir': 'runs/fashion_mnist',
    'overrides': [
      {**setting, 'seed': seed}
      for seed in (0, 1, 2)
      for setting in [{'sift': 'dense'}, wide, *blocked]
    ],
  }
