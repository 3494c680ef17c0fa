"""Shared pieces of the experiment configs: the default groups and the argument forms.

Every file under configs/ builds its ConfigDict from `base_config()` and reads its
argument through `parse_arg`, so the short forms of DESIGN.md (`local`, `sift=`,
`sparsity=`, `rule=`, `seed=`) mean the same thing in every experiment family.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

SHORT_FORMS = ('sift', 'sparsity', 'rule', 'seed')

# Keys that only say how long a run is or how often it reports; a resumed run may change them.
RUN_LENGTH_KEYS = (
  'total_steps',
  'log_every_steps',
  'eval_every_steps',
  'checkpoint_every_steps',
  'checkpoint.keep',
  'eval.max_examples',
  'progress',
  'analysis.spectral',  # what is logged, not what is trained
  # Where the processes of a run meet is not part of the experiment.
  'distributed.initialize',
  'distributed.coordinator_address',
  'distributed.num_processes',
  'distributed.process_id',
)


def parse_arg(arg: str | None) -> dict[str, str | bool]:
  """'local,sift=wide,sparsity=0.75' -> {'local': True, 'sift': 'wide', 'sparsity': '0.75'}."""
  out: dict[str, str | bool] = {'local': False}
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    if '=' in part:
      key, value = part.split('=', 1)
      if key not in SHORT_FORMS:
        raise ValueError(
          f'unknown config argument {key!r} in {arg!r}; allowed: local, '
          + ', '.join(f'{k}=' for k in SHORT_FORMS)
        )
      out[key] = value
    elif part == 'local':
      out['local'] = True
    else:
      raise ValueError(
        f'unknown config argument {part!r} in {arg!r}; allowed: local, '
        + ', '.join(f'{k}=' for k in SHORT_FORMS)
      )
  return out


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment family; each config file overrides what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 128  # global, over all devices and hosts
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.progress = True  # one progress line per log step on stdout

  c.model = ml_collections.ConfigDict()
  c.model.name = 'mlp'
  c.model.remat = False  # rematerialise block activations (saves memory for wide models)
  c.model.dtype = 'float32'  # compute dtype; 'bfloat16' on GPU/TPU (params stay float32)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'digits'
  c.data.dir = ''  # '' = $SIFT_DATA_DIR, else the user cache folder
  c.data.train_files = ''  # text_files: comma-separated glob patterns
  c.data.eval_files = ''
  c.data.seq_len = 0  # text: tokens per example (0 = the model's context length)
  c.data.augment = True  # images: the dataset's standard training augmentation
  c.data.max_bytes = 20_000_000  # python_stdlib: corpus cap (about 1 s to load)

  c.eval = ml_collections.ConfigDict()
  c.eval.max_examples = 0  # 0 = the whole eval split
  c.eval.batch_size = 0  # 0 = batch_size

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'  # sgd | adamw
  c.optim.lr = 0.1  # peak learning rate
  c.optim.schedule = 'constant'  # constant | multistep | cosine
  c.optim.warmup_steps = 0
  c.optim.decay_fractions = (0.3, 0.6, 0.8)  # multistep: where lr is multiplied by decay_factor
  c.optim.decay_factor = 0.2
  c.optim.end_lr = 0.0  # cosine: final learning rate
  c.optim.momentum = 0.9  # sgd
  c.optim.nesterov = False
  c.optim.b1 = 0.9  # adamw
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.decay_norm_and_bias = True  # False: no weight decay on BatchNorm/LayerNorm and biases
  c.optim.clip_norm = 0.0  # global gradient norm clip; 0 = off
  c.optim.label_smoothing = 0.0
  c.optim.grad_accum_steps = 1

  c.sparsity = ml_collections.ConfigDict()
  c.sparsity.rule = 'dense'  # dense | static | set | rigl | topkast | gse | gmp
  c.sparsity.level = 0.0  # the one sparsity s
  c.sparsity.backward_level = 0.0  # Top-KAST backward-set sparsity (<= level)
  c.sparsity.distribution = 'uniform'  # uniform | erk
  c.sparsity.update_every_steps = 100  # dT
  c.sparsity.start_step = 0
  c.sparsity.end_fraction = 0.75  # updates stop at this fraction of total_steps
  c.sparsity.drop_fraction = 0.3  # f_0
  c.sparsity.drop_schedule = 'cosine'  # constant | cosine | exponential (f_t from f_0)
  c.sparsity.drop_decay = 0.1  # exponential: f_t = f_0 * drop_decay ** (t / T_end)
  c.sparsity.regrow_dropped = True  # RigL/SET: weights dropped in an update may regrow in it
  c.sparsity.power_scale = 1.0  # ERK: density ~ (sum(shape) / prod(shape)) ** power_scale
  c.sparsity.overrides = ''  # per-layer sparsity: 'glob=s,glob=s' on names like Dense_0/kernel
  c.sparsity.block_shape = (1, 1)  # mask blocks over a kernel's last two axes; (1, 1) unstructured
  c.sparsity.balanced = False  # the same number of active blocks in every output block-column
  c.sparsity.execution = 'masked'  # masked | block_sparse (balanced blocks, Dense kernels only)
  c.sparsity.init_rescale = False  # scale init by each unit's actual fan-in (GSE paper: True)
  c.sparsity.topkast_penalty = 1e-4  # lambda of the exploration penalty
  c.sparsity.topkast_every_steps = 100  # N: sets A and B recomputed every N steps
  c.sparsity.gse_gamma = 1.0  # candidates sampled per update = gamma * active (ImageNet: 2)
  c.sparsity.gse_alpha = 0.2  # grown per update = alpha_t * active, alpha_t by drop_schedule

  c.sift = ml_collections.ConfigDict()
  c.sift.name = 'dense'  # dense | wide | parallel | factorized | doped
  c.sift.match_flops = False  # solve the mask sparsity so model FLOPs equal the dense model's
  c.sift.factorized_between = 'norm_relu'  # none | norm | norm_relu, between U and V
  c.sift.doped_sparse_uv = False  # True: the original release's sparse U V (not iso-FLOP)
  c.sift.rounding = 'original'  # original (b = round(1/(1-s))) | exact

  c.analysis = ml_collections.ConfigDict()
  c.analysis.spectral = False  # spectral metrics of the masks on eval steps (SPEC.md section 4)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 3  # keep the last K checkpoints

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = every device not used by fsdp
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**14  # state leaves with fewer elements stay replicated

  # Multi-host: jax.distributed.initialize() before any device is touched. Values left at
  # their defaults come from the environment (the launcher, or a TPU/GPU cluster's own).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # True: join a cluster (auto-detected on TPU pods, SLURM)
  c.distributed.coordinator_address = ''  # host:port of process 0
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c


def apply_short_forms(c: ml_collections.ConfigDict, args: dict[str, str | bool]) -> None:
  """Applies `sift=`, `sparsity=`, `rule=`, `seed=` to a config in place."""
  if 'seed' in args:
    c.seed = int(args['seed'])
  if 'sift' in args:
    c.sift.name = str(args['sift'])
  if 'sparsity' in args:
    c.sparsity.level = float(args['sparsity'])
    if 'rule' not in args and c.sparsity.rule == 'dense':
      c.sparsity.rule = 'static'
  if 'rule' in args:
    c.sparsity.rule = str(args['rule'])
  if c.sparsity.rule == 'dense' and c.sparsity.level > 0:
    raise ValueError(
      f'rule=dense with sparsity={c.sparsity.level}: a dense run has no sparsity; '
      'pick a rule (static, set, rigl, topkast, gse, gmp) or drop sparsity='
    )


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads `get_config(arg)` from a config file by path (for notebooks, tests, derived configs)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  name = 'sift_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def join_arg(args: dict[str, str | bool]) -> str:
  """The inverse of `parse_arg`."""
  parts = ['local'] if args.get('local') else []
  parts += [f'{k}={v}' for k, v in args.items() if k != 'local']
  return ','.join(parts)
