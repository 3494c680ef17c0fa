"""dst_rules, tinyshakespeare GPT: the sparse training rules at s = 0.9 (issue 10, section 3c).

The `local` GPT on tinyshakespeare: dense; static, SET, RigL, GSE and GMP at s = 0.9; Top-KAST at
forward/backward sparsity 0.9/0.8 and 0.8/0.5; 3 seeds: sweep.py's runs at those levels, with
sift_language's run length.
"""

import os

from sift_jax import sweep

HERE = os.path.dirname(os.path.abspath(__file__))


def get_sweep():
  rules = sweep.load_sweep(os.path.join(HERE, 'sweep.py'))['overrides']
  language = sweep.load_sweep(os.path.join(HERE, '..', 'sift_language', 'sweep.py'))['fixed']
  return {
    'config': 'configs/gpt_small_dense.py:local',
    'fixed': {'data.name': 'tiny_shakespeare', **language},
    'runs_dir': 'runs/gpt',
    'overrides': [o for o in rules if o.get('rule') == 'topkast' or o.get('sparsity', 0.9) == 0.9],
  }
