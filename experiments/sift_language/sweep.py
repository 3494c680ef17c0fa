"""sift_language: Sparse-IFT members against dense and wider dense GPTs (issue 10, section 3a).

The `local` byte/char-level GPT (4 layers, d 128, context 128, batch 16) on tinyshakespeare
(65 characters) and PTB (the project's word-level loader, 10,000 words). Per dataset: dense;
Sparse Wide at s = 0.5 and 0.75, static and RigL; Sparse Parallel, Factorized and Doped at
s = 0.5 with RigL; dense models widened to 1.97x (d 184) and 3.92x (d 264) the training FLOPs
(`python -m sift_jax.model_report`). Same steps and tokens for every run. The list runs tinyshakespeare
first, seed 0 of every setting before seeds 1 and 2, then PTB likewise; each dataset's first run
is its dense seed 0, which checks the run length against the plateau bar (README.md).
"""

from sift_jax import sweep

STEPS = 6_400  # 800, 1,600, 4,800 left dense moving 3.4%, 4.2%, 2.4% over the last fifth
DATASETS = ('tiny_shakespeare', 'ptb')
SEEDS = (0, 1, 2)
# Widened dense: d_model and d_ff = 4 d_model scaled so training FLOPs are about 2x and 4x.
WIDER = ((184, 736), (264, 1056))


def settings() -> list[dict]:
  """Every setting of one dataset and seed, dense first."""
  out = [{'sift': 'dense'}]
  out += sweep.product(sift=['wide'], sparsity=[0.5, 0.75], rule=['static', 'rigl'])
  out += sweep.product(sift=['parallel', 'factorized', 'doped'], sparsity=[0.5], rule=['rigl'])
  out += [{'sift': 'dense', 'model.d_model': d, 'model.d_ff': f} for d, f in WIDER]
  return out


def get_sweep():
  return {
    'config': 'configs/gpt_small_dense.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10, 'log_every_steps': 40},
    'overrides': [
      {'data.name': data, **s, 'seed': seed}
      for data in DATASETS
      for seed in SEEDS
      for s in settings()
    ],
  }
