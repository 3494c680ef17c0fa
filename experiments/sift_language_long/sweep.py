"""sift_language_long: does Sparse Wide's gain survive training to a plateau? (issue 22, item 3)

The sift_language PTB grid (sift_language/sweep_ptb.py) trains 4,000 steps, 0.8 epochs of the
5.1M training characters, where the dense model is still learning (-2.9 to -3.4% over the last
fifth) and Sparse Wide 0.5 leads it by 0.043 nats/char; one seed at 16,000 steps showed a lead of
0.006. Here the same model and data run 16,000 steps (about 3 epochs) for 3 seeds: dense, the
dense model widened to 2x its training FLOPs, and Sparse Wide at s = 0.5 and 0.75 with static
masks (the member and rule that won at 4,000 steps). Seed 0 of every setting runs first.

  python -m sift_jax.sweep experiments/sift_language_long/sweep.py

About 5 CPU hours in all (a dense run at 4,000 steps took ~7 min here); it resumes across
sittings, and finished runs' records (records/) are committed as they finish.
"""

import os

from sift_jax import sweep

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 16_000  # ~3 epochs of PTB characters at 1,024 tokens per step
SEEDS = (0, 1, 2)
WIDER_2X = {'model.d_model': 92, 'model.d_ff': 368}  # sift_language's 1.97x-FLOPs dense model


def settings() -> list[dict]:
  """Every setting of one seed, dense first."""
  return [
    {'sift': 'dense'},
    *sweep.product(sift=['wide'], sparsity=[0.5, 0.75], rule=['static']),
    {'sift': 'dense', **WIDER_2X},
  ]


def get_sweep():
  spec = sweep.load_sweep(os.path.join(HERE, '..', 'sift_language', 'sweep.py'))
  return {
    'config': spec['config'],
    'fixed': {
      **spec['fixed'],
      'data.name': 'ptb_chars',
      'total_steps': STEPS,
      'eval_every_steps': STEPS // 10,
    },
    'runs_dir': 'runs/ptb_chars',
    'overrides': [{**s, 'seed': seed} for seed in SEEDS for s in settings()],
  }
