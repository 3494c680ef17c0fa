"""dst_rules, Fashion-MNIST: the rules' open claims, 3 seeds each (issue 22, item 4).

On sweep.py's MLP and length:
- GSE with gamma = 2 (twice as many sampled candidates, the paper's ImageNet setting) against
  gamma = 1 at s = 0.95 and 0.98;
- RigL with the ERK distribution against uniform at s = 0.9 and 0.95 (the RigL paper: ERK wins);
- Top-KAST at forward sparsity 0.9 with backward sparsity 0.8, 0.5 and 0.0, and at 0.9/0.8 with
  its exploration penalty off (lambda = 0);
- dense, the reference.
39 runs of about a CPU minute each.
"""

from sift_jax import sweep

STEPS = 1_500  # sweep.py's length
SEEDS = [0, 1, 2]


def get_sweep():
  gse = sweep.product(rule=['gse'], sparsity=[0.95, 0.98], **{'sparsity.gse_gamma': [1.0, 2.0]})
  rigl = sweep.product(
    rule=['rigl'], sparsity=[0.9, 0.95], **{'sparsity.distribution': ['uniform', 'erk']}
  )
  topkast = [
    {'rule': 'topkast', 'sparsity': 0.9, 'sparsity.backward_level': b} for b in (0.8, 0.5, 0.0)
  ]
  topkast.append({**topkast[0], 'sparsity.topkast_penalty': 0.0})
  settings = [{'sift': 'dense'}, *gse, *rigl, *topkast]
  return {
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10},
    'runs_dir': 'runs/fashion_mnist_open',
    'overrides': [{**s, 'seed': seed} for seed in SEEDS for s in settings],
  }
