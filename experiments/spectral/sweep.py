"""spectral: do the masks' spectral metrics predict accuracy? (issue 10, section 3d).

Sparse Wide on the Fashion-MNIST MLP (`mlp_fashion_mnist.py:local`) at s = 0.5, 0.75 and 0.9,
static masks against RigL, 3 seeds, with `analysis.spectral=True`: the Ramanujan gap, weighted
spectral gap and their iterative means of every sparse layer logged on each eval step (10 per
run). The reading is their Spearman rank correlation with final test accuracy across runs.
"""

from sift_jax import sweep

STEPS = 1_500  # sift_vision's Fashion-MNIST length


def get_sweep():
  return {
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10, 'analysis.spectral': True},
    'overrides': sweep.product(
      sift=['wide'], sparsity=[0.5, 0.75, 0.9], rule=['static', 'rigl'], seed=[0, 1, 2]
    ),
  }
