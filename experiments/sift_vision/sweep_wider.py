"""sift_vision, Fashion-MNIST: what more dense FLOPs buy (the paper's "larger dense" yardstick).

Dense MLPs widened to 2x and 4x the dense MLP's training FLOPs, 3 seeds, sweep.py's length, in
sweep.py's runs folder so one report puts them beside the members.
"""

from sift_jax import sweep

STEPS = 1_500  # sweep.py's length
# Hidden widths 1,576 and 2,360 give 2.0x and 4.0x the dense MLP's training FLOPs (0.0224 and
# 0.0447 against 0.0112 GFLOPs per example, `python -m sift_jax.model_report
# --config=configs/mlp_fashion_mnist.py:local --config.model.hidden="(1576, 1576)"`).
WIDER = ((1576, 1576), (2360, 2360))


def get_sweep():
  return {
    'config': 'configs/mlp_fashion_mnist.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10},
    'runs_dir': 'runs/fashion_mnist',
    'overrides': sweep.product(sift=['dense'], **{'model.hidden': WIDER}, seed=[0, 1, 2]),
  }
