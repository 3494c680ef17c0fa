"""sift_vision, Fashion-MNIST: the four Sparse-IFT members against dense (issue 10, section 3b).

The 784-1024-1024-10 MLP (`mlp_fashion_mnist.py:local`): dense, and Sparse Wide, Parallel,
Factorized and Doped at s = 0.5 and 0.75 with RigL, 3 seeds. The CIFAR-10 half is sweep_cifar.py;
the two halves keep separate runs folders so each gets its own report.
"""

from sift_jax import sweep

STEPS = 1_500  # the local config's length; the README records the dense pilot's plateau check


def get_sweep():
  return {
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10},
    'runs_dir': 'runs/fashion_mnist',
    'overrides': [{'sift': 'dense', 'seed': seed} for seed in (0, 1, 2)]
    + sweep.product(
      sift=['wide', 'parallel', 'factorized', 'doped'],
      sparsity=[0.5, 0.75],
      rule=['rigl'],
      seed=[0, 1, 2],
    ),
  }
