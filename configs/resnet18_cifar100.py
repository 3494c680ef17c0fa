"""ResNet-18 (CIFAR stem) on CIFAR-100, the Sparse-IFT paper's recipe (docs/methods.md section 5).

Full run (GPU; CIFAR-100 prepared for tensorflow-datasets under the data root):
  python -m sift_jax.main --config=configs/resnet18_cifar100.py:sift=wide,sparsity=0.9,rule=rigl
  200 epochs of 391 steps; the paper reports dense 77.0 and Sparse Wide 90% 80.1 top-1.

Local run (one CPU, the CIFAR-10 JPEG copy under $SIFT_DATA_DIR, a few minutes):
  python -m sift_jax.main --config=configs/resnet18_cifar100.py:local
"""

from sift_jax import config_lib
from sift_jax.models import model_config

STEPS_PER_EPOCH = 391  # ceil(50,000 / 128)


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.total_steps = 200 * STEPS_PER_EPOCH
  c.batch_size = 128
  c.log_every_steps = 100
  c.eval_every_steps = 10 * STEPS_PER_EPOCH
  c.checkpoint_every_steps = 5 * STEPS_PER_EPOCH

  c.model = model_config('resnet', depth=18, stem='cifar', width=64)
  c.data.name = 'cifar100'

  c.optim.name = 'sgd'
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4  # on every parameter, as the original code
  c.optim.schedule = 'multistep'
  c.optim.decay_fractions = (0.3, 0.6, 0.8)  # epochs 60 / 120 / 160 of 200
  c.optim.decay_factor = 0.2

  c.sparsity.update_every_steps = 100
  c.sparsity.drop_fraction = 0.3
  c.sparsity.end_fraction = 0.75

  if args['local']:
    # A quarter-width ResNet-18 on the CIFAR-10 JPEGs: same code path, CPU-sized.
    c.total_steps = 300
    c.batch_size = 64
    c.log_every_steps = 25
    c.eval_every_steps = 150
    c.checkpoint_every_steps = 100
    c.model.width = 16
    c.data.name = 'cifar10_jpg'
    c.eval.max_examples = 1_000
    c.optim.lr = 0.05
    c.optim.schedule = 'cosine'
    c.optim.warmup_fraction = 1 / 15  # 20 of 300 steps
    c.sparsity.update_every_steps = 25
  config_lib.apply_short_forms(c, args)
  return c
