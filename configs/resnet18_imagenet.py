"""ResNet-18 (ImageNet stem) on ImageNet-2012 (docs/methods.md section 5); `local` runs on one CPU.

Full run (GPU/TPU; imagenet2012 prepared for tensorflow-datasets under the data root):
  python -m sift_jax.main --config=configs/resnet18_imagenet.py:sift=wide,sparsity=0.9,rule=rigl
  90 epochs of 5,005 steps; the paper reports dense 70.9 and Sparse Wide 90% 74.4 top-1.

Local run (one CPU, CIFAR-10 JPEGs under $SIFT_DATA_DIR through the ImageNet stem):
  python -m sift_jax.main --config=configs/resnet18_imagenet.py:local
"""

from sift_jax import config_lib
from sift_jax.models import model_config

STEPS_PER_EPOCH = 5_005  # ceil(1,281,167 / 256)


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.total_steps = 90 * STEPS_PER_EPOCH
  c.batch_size = 256
  c.log_every_steps = 100
  c.eval_every_steps = 5 * STEPS_PER_EPOCH
  c.checkpoint_every_steps = STEPS_PER_EPOCH

  c.model = model_config('resnet', depth=18, stem='imagenet', width=64)
  c.model.dtype = 'bfloat16'
  c.data.name = 'imagenet2012'

  c.optim.name = 'sgd'
  c.optim.lr = 0.256  # 0.1 x batch / 100, the NVIDIA recipe the paper follows
  c.optim.momentum = 0.875
  c.optim.weight_decay = 1 / 32_768
  c.optim.decay_norm_and_bias = False
  c.optim.label_smoothing = 0.1
  c.optim.schedule = 'cosine'
  c.optim.warmup_fraction = 5 / 90  # 5 of 90 epochs

  c.sparsity.update_every_steps = 100
  c.sparsity.end_fraction = 0.75

  if args['local']:
    c.total_steps = 200
    c.batch_size = 64
    c.log_every_steps = 25
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    c.model.width = 16
    c.model.dtype = 'float32'
    c.data.name = 'cifar10_jpg'
    c.eval.max_examples = 1_000
    c.optim.lr = 0.05
    c.optim.warmup_fraction = 0.1  # 20 of 200 steps
    c.sparsity.update_every_steps = 25
  config_lib.apply_short_forms(c, args)
  return c
