"""ResNet-34 (ImageNet stem) on ImageNet-2012: the ResNet-18 recipe with depth 34.

python -m sift_jax.main --config=configs/resnet34_imagenet.py:sift=parallel,sparsity=0.75
python -m sift_jax.main --config=configs/resnet34_imagenet.py:local
"""

import os

from sift_jax import config_lib


def get_config(arg: str | None = None):
  resnet18 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'resnet18_imagenet.py')
  c = config_lib.load_config(resnet18, arg)
  c.model.depth = 34
  return c
