"""GPT-3 Small, Sparse Wide (docs/methods.md section 1), on WikiText-103; `local` runs on one CPU.

Sparse Wide at s = 0.5 (static masks) widens d_model 768 -> 1092 and d_ff -> 4368 and keeps every
transformed kernel at 50% sparsity, so the transformed layers cost the dense model's FLOPs.

  python -m sift_jax.main --config=configs/gpt_small_wide.py:local   # ~5 CPU minutes, eval ~2.1
  python -m sift_jax.main --config=configs/gpt_small_wide.py:smoke   # 30 steps, ~40 CPU seconds
  python -m sift_jax.main --config=configs/gpt_small_wide.py:sparsity=0.75,rule=rigl

`gpt_small_wide.py:local` is exactly `gpt_small_dense.py:local` plus the transformation.
"""

import os

from sift_jax import config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  args.setdefault('sift', 'wide')
  args.setdefault('sparsity', '0.5')  # the paper's static 50% run
  dense = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpt_small_dense.py')
  return config_lib.load_config(dense, config_lib.join_arg(args))
