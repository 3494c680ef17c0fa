"""dst_rules, Fashion-MNIST: the sparse training rules at high sparsity (issue 10, section 3c).

The 784-1024-1024-10 MLP (`mlp_fashion_mnist.py:local`): dense; static, SET, RigL, GSE and GMP
at s = 0.9, 0.95 and 0.98; Top-KAST at forward/backward sparsity 0.9/0.8 and 0.8/0.5; 3 seeds.
The tinyshakespeare GPT half is sweep_gpt.py (its own runs folder and report).
"""

from sift_jax import sweep

STEPS = 1_500  # the local config's length; the README records the dense pilot's plateau check
SEEDS = [0, 1, 2]


def rule_grid(levels: list[float]) -> list[dict]:
  """Dense, the five rules at each level, and the two Top-KAST pairs, every seed."""
  out = sweep.product(sift=['dense'], seed=SEEDS)
  out += sweep.product(rule=['static', 'set', 'rigl', 'gse', 'gmp'], sparsity=levels, seed=SEEDS)
  for forward, backward in ((0.9, 0.8), (0.8, 0.5)):
    out += [
      {'rule': 'topkast', 'sparsity': forward, 'sparsity.backward_level': backward, 'seed': s}
      for s in SEEDS
    ]
  return out


def get_sweep():
  return {
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10},
    'runs_dir': 'runs/fashion_mnist',
    'overrides': rule_grid([0.9, 0.95, 0.98]),
  }
