"""A 784-1024-1024-10 MLP on Fashion-MNIST: the quick testbed for sparse training rules.

python -m sift_jax.main --config=configs/mlp_fashion_mnist.py:local,rule=rigl,sparsity=0.9
Dense reaches about 88% test accuracy (benchmarks/README.md has the measured numbers per rule).
"""

from sift_jax import config_lib
from sift_jax.models import model_config

STEPS_PER_EPOCH = 469  # ceil(60,000 / 128)


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.total_steps = 30 * STEPS_PER_EPOCH
  c.batch_size = 128
  c.log_every_steps = 100
  c.eval_every_steps = 5 * STEPS_PER_EPOCH
  c.checkpoint_every_steps = 5 * STEPS_PER_EPOCH

  c.model = model_config('mlp', hidden=(1024, 1024))
  c.data.name = 'fashion_mnist'
  c.data.augment = False  # the MLP sees flattened pixels: crops and flips do not help it

  c.optim.name = 'sgd'
  c.optim.lr = 0.05
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine'

  c.sparsity.update_every_steps = 100
  c.sparsity.drop_fraction = 0.3
  c.sparsity.end_fraction = 0.75

  if args['local']:
    c.total_steps = 1_500
    c.batch_size = 256
    c.log_every_steps = 100
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.sparsity.update_every_steps = 50
  config_lib.apply_short_forms(c, args)
  return c
