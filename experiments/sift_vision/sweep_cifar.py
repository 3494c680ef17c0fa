"""sift_vision, CIFAR-10: the four Sparse-IFT members against dense (issue 10, section 3b).

The width-16 ResNet-18 on the CIFAR-10 JPEGs (`resnet18_cifar100.py:local`, class-balanced eval
subset of 1,000 test images): sweep.py's runs (dense, and Sparse Wide, Parallel, Factorized and
Doped at s = 0.5 and 0.75 with RigL, 3 seeds).
"""

import os

from sift_jax import sweep

HERE = os.path.dirname(os.path.abspath(__file__))

STEPS = 600  # 300 left the dense eval loss moving 2.5% over its last fifth (README.md)


def get_sweep():
  return {
    'config': 'configs/resnet18_cifar100.py:local',
    'fixed': {'total_steps': STEPS, 'eval_every_steps': STEPS // 10},
    'runs_dir': 'runs/cifar10',
    'overrides': sweep.load_sweep(os.path.join(HERE, 'sweep.py'))['overrides'],
  }
