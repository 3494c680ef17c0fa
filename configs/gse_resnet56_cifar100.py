"""ResNet-56 on CIFAR-100 trained always-sparse with GSE, the GSE paper's setting (docs/methods.md 3, 5).

Heddes et al., "Always-Sparse Training by Growing Connections with Guided Stochastic
Exploration" (arXiv 2401.06898); values marked [code] are from the authors' release
(github.com/mikeheddes/guided-stochastic-exploration: config.py, training.py,
our_training.py, layers.py). The paper reports 54.3 top-1 for ResNet-56 at 98% sparsity.

Full run (GPU; CIFAR-100 prepared for tensorflow-datasets under the data root):
  python -m sift_jax.main --config=configs/gse_resnet56_cifar100.py
  python -m sift_jax.main --config=configs/gse_resnet56_cifar100.py:sparsity=0.9,rule=rigl

Local run (one CPU, the CIFAR-10 JPEG copy under $SIFT_DATA_DIR, about 3 minutes): ResNet-20,
300 steps, the same sparsity settings with updates every 50 steps.
  python -m sift_jax.main --config=configs/gse_resnet56_cifar100.py:local

What `rule=gse` picks up in any other config (e.g. resnet18_cifar100.py:rule=gse) differs from
this paper setting: uniform distribution (here `er`), no fan-in rescale of the init (here on,
with the GSE code's uniform init), dT = 100 (here 1000), updates until 75% of training (here
60%), and the stem and classifier dense (here sparse). gamma = 1 and alpha = 0.2 with cosine
decay are the same.

Kept different from the GSE code on purpose (sift_jax's rule semantics, docs/methods.md section 3):
every layer keeps its exact active count (the code grows and prunes with one global top-k over
all layers, so layer densities drift from the initial distribution); the grow gradients are
those of the training batch (the code draws 10 extra examples per class at each update);
candidates are sampled among inactive positions only, without replacement.
"""

from sift_jax import config_lib
from sift_jax.models import model_config

STEPS_PER_EPOCH = 391  # ceil(50,000 / 128)


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.total_steps = 200 * STEPS_PER_EPOCH  # 200 epochs [paper, code]
  c.batch_size = 128  # [code]
  c.log_every_steps = 100
  c.eval_every_steps = 10 * STEPS_PER_EPOCH
  c.checkpoint_every_steps = 5 * STEPS_PER_EPOCH

  # He et al.'s CIFAR ResNet-56 (option-A shortcuts), every conv and linear sparse [code:
  # layers.sparsify]; init U(+-sqrt(3 / active fan-in)) [code: init_masked_params].
  c.model = model_config(
    'resnet_cifar', depth=56, width=16, kernel_init='lecun_uniform', sparse_ends=True
  )
  c.data.name = 'cifar100'

  c.optim.name = 'sgd'  # momentum 0.9, no Nesterov [code]
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4  # on every parameter [code]
  c.optim.schedule = 'multistep'
  c.optim.decay_fractions = (0.4, 0.6)  # epochs 80 and 120 of 200 [code: milestones]
  c.optim.decay_factor = 0.1
  c.optim.warmup_fraction = 5 / 200  # 5 of 200 epochs of linear warmup [code]

  c.sparsity.rule = 'gse'
  c.sparsity.level = 0.98  # [paper]
  c.sparsity.distribution = 'er'  # Erdos-Renyi over (C_in kh kw, C_out) [code: erdos-renyi]
  c.sparsity.init_rescale = True  # scale by each unit's active fan-in [paper, code]
  c.sparsity.update_every_steps = 1000  # dT [paper; code: prune_grow_delta]
  c.sparsity.end_fraction = 0.6  # updates until epoch 120 of 200 [code: prune_grow_finish]
  c.sparsity.gse_gamma = 1.0  # candidates = gamma * active on CIFAR [paper; code: grow_subset]
  c.sparsity.gse_alpha = 0.2  # grown per update, cosine to 0 at the end [paper, code]
  c.sparsity.drop_schedule = 'cosine'

  if args['local']:
    # ResNet-20 on the CIFAR-10 JPEGs: the same code path, CPU-sized.
    c.total_steps = 300
    c.batch_size = 32
    c.log_every_steps = 25
    c.eval_every_steps = 150
    c.checkpoint_every_steps = 100
    c.model.depth = 20
    c.data.name = 'cifar10_jpg'
    c.eval.max_examples = 1_000
    c.optim.schedule = 'cosine'
    c.optim.warmup_fraction = 1 / 15  # 20 of 300 steps
    c.sparsity.update_every_steps = 50
  config_lib.apply_short_forms(c, args)
  if c.sift.name != 'dense':
    c.sparsity.distribution = 'uniform'  # a Sparse-IFT member is iso-FLOP under uniform only
  return c
