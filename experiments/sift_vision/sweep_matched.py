"""sift_vision, Fashion-MNIST: Sparse Wide at matched FLOPs (issue 22, item 4).

On the 784-1024-1024-10 MLP Sparse Wide cannot widen its 784 inputs, so at the nominal s its
transformed layers cost 0.87x / 0.78x the dense model's forward FLOPs at s = 0.5 / 0.75, and
sweep.py's reading "Wide does not beat dense on the MLP" was made below dense FLOPs.
`sift.match_flops=True` solves the mask sparsity so the model's FLOPs equal the dense model's.
Dense, Sparse Wide (RigL) at s = 0.5 and 0.75 as sweep.py runs it, and the same at matched
FLOPs, 3 seeds: 15 runs of ~1-2 CPU minutes.
"""

from sift_jax import sweep

STEPS = 1_500  # sweep.py's length, so the unmatched runs repeat its settings


def get_sweep():
  wide = sweep.product(
    sift=['wide'], sparsity=[0.5, 0.75], rule=['rigl'], **{'sift.match_flops': [False, True]}
  )
  return {
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10},
    'runs_dir': 'runs/fashion_mnist_matched',
    'overrides': [{**s, 'seed': seed} for seed in (0, 1, 2) for s in [{'sift': 'dense'}, *wide]],
  }
