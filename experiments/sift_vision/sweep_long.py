"""sift_vision, Fashion-MNIST at 3x the steps: does the gap to dense close with more training?

In the 1,500-step study (sweep.py) Sparse Wide stayed below dense (0.8918 and 0.8859 against
0.8934). Sparse models are often said to need longer training than dense ones (RigL's paper
trains up to 5x longer), so this checks one thing that might have to change: dense against Sparse
Wide at s = 0.5 and 0.75 with RigL at 4,500 steps (19 epochs), 3 seeds, in its own runs folder
and report. Not run yet (README.md).
"""

from sift_jax import sweep

STEPS = 4_500


def get_sweep():
  return {
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10},
    'runs_dir': 'runs/fashion_mnist_long',
    'overrides': [{'sift': 'dense', 'seed': seed} for seed in (0, 1, 2)]
    + sweep.product(sift=['wide'], sparsity=[0.5, 0.75], rule=['rigl'], seed=[0, 1, 2]),
  }
