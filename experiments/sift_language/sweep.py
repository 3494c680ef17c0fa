"""sift_language: Sparse-IFT members against dense and wider dense GPTs (issue 10, section 3a).

A character-level GPT on tinyshakespeare (65 characters) small enough that the whole grid runs
in a few CPU hours here: the `local` preset of configs/gpt_small_dense.py narrowed to d 64
(4 layers, 4 heads, d_ff 256, context 64, batch 16 = 1,024 tokens per step). Dense; Sparse Wide
at s = 0.5 and 0.75, static and RigL; Sparse Parallel, Factorized and Doped at s = 0.5 with RigL;
dense models widened to 1.97x (d 92) and 3.91x (d 132) the training FLOPs
(`python -m sift_jax.model_report`). Same steps and tokens for every run; seed 0 of every setting
runs before seeds 1 and 2. PTB (character level) is sweep_ptb.py.
"""

from sift_jax import sweep

STEPS = 4_000  # the dense pilot's eval loss moves 1.9% over the last fifth (README.md)
SEEDS = (0, 1, 2)
SHAPE = {'model.d_model': 64, 'model.d_ff': 256, 'model.context_length': 64}
# Widened dense: d_model and d_ff = 4 d_model scaled so training FLOPs are about 2x and 4x.
WIDER = ((92, 368), (132, 528))


def settings() -> list[dict]:
  """Every setting of one seed, dense first."""
  out = [{'sift': 'dense'}]
  out += sweep.product(sift=['wide'], sparsity=[0.5, 0.75], rule=['static', 'rigl'])
  out += sweep.product(sift=['parallel', 'factorized', 'doped'], sparsity=[0.5], rule=['rigl'])
  out += [{'sift': 'dense', 'model.d_model': d, 'model.d_ff': f} for d, f in WIDER]
  return out


def get_sweep():
  return {
    'config': 'configs/gpt_small_dense.py:local',
    'fixed': {
      'data.name': 'tiny_shakespeare',
      **SHAPE,
      'optim.warmup_fraction': 0.1,  # the paper's GPT recipe; 1/3 missed the plateau bar
      'total_steps': STEPS,
      'eval_every_steps': STEPS // 10,
      'log_every_steps': 100,
    },
    'runs_dir': 'runs/tiny_shakespeare',
    'overrides': [{**s, 'seed': seed} for seed in SEEDS for s in settings()],
  }
