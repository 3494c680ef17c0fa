"""VGG-16 (BatchNorm) on CIFAR-100 trained always-sparse with GSE, the GSE paper's setting.

Everything as configs/gse_resnet56_cifar100.py (same optimizer, schedule and GSE settings, from
the paper and the authors' code) except the model: the code's `vgg16_bn_small`, VGG-16 at a
quarter of the usual width (16 to 128 channels) with a 512-wide classifier and dropout 0.5
(sift_jax/models/cifar.py). The paper reports 40.8 top-1 at 98% sparsity.

  python -m sift_jax.main --config=configs/gse_vgg16_cifar100.py
  python -m sift_jax.main --config=configs/gse_vgg16_cifar100.py:local   # width 8, CIFAR-10 JPEGs
"""

import os

from sift_jax import config_lib
from sift_jax.models import model_config


def get_config(arg: str | None = None):
  resnet = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gse_resnet56_cifar100.py')
  c = config_lib.load_config(resnet, arg)
  c.model = model_config(
    'vgg', depth=16, width=16, dropout=0.5, kernel_init='lecun_uniform', sparse_ends=True
  )
  if config_lib.parse_arg(arg)['local']:
    c.model.width = 8
  return c
