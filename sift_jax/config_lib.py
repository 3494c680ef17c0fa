"""Shared pieces of the experiment configs: the default groups, the argument forms, loading.

Every file under configs/ builds its ConfigDict from `base_config()` and reads its
argument through `parse_arg`, so the short forms (`local`, `sift=`, `sparsity=`, `rule=`,
`seed=`) mean the same thing in every experiment family (docs/design.md).

The config files ship with the package (`sift_jax/configs` is a link to the repository's
`configs/`), so `configs/<file>.py` loads from any working directory.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import ml_collections

from sift_jax.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / 'configs'
CONFIG_PREFIX = 'configs/'
SAVED_CONFIG = 'config.json'  # a run's config, written into its workdir


class ConfigError(UserError, ValueError):
  """A config file, argument or key that does not exist."""


SHORT_FORMS = ('sift', 'sparsity', 'rule', 'seed')
FLAG_ARGS = ('local', 'smoke')  # `smoke` is `local` cut to SMOKE_STEPS
SMOKE_STEPS = 30  # a first run through every part of the loop in about 30 s on a CPU


def parse_arg(arg: str | None) -> dict[str, str | bool]:
  """'local,sift=wide,sparsity=0.75' -> {'local': True, 'smoke': False, 'sift': 'wide', ...}.

  `smoke` implies `local`: the configs build their local run, then apply_short_forms shrinks it.
  """
  allowed = ', '.join([*FLAG_ARGS, *(f'{k}=' for k in SHORT_FORMS)])
  out: dict[str, str | bool] = {'local': False, 'smoke': False}
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    if '=' in part:
      key, value = part.split('=', 1)
      if key not in SHORT_FORMS:
        raise ConfigError(f'unknown config argument {key!r} in {arg!r}; allowed: {allowed}')
      out[key] = value
    elif part in FLAG_ARGS:
      out[part] = True
      out['local'] = True
    else:
      raise ConfigError(f'unknown config argument {part!r} in {arg!r}; allowed: {allowed}')
  return out


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment family; each config file overrides what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds the params, masks, data order and dropout
  c.total_steps = 1000  # optimizer steps of the run (the schedules are functions of it)
  c.batch_size = 128  # global, over all devices and hosts
  c.log_every_steps = 50  # a metrics.jsonl row and a progress line every N steps
  c.eval_every_steps = 500  # evaluate every N steps (and at the last step)
  c.checkpoint_every_steps = 500  # save a checkpoint every N steps (and at the last step)
  c.progress = True  # one progress line per log step on stdout

  c.model = ml_collections.ConfigDict()
  c.model.name = 'mlp'  # a registered model: mlp | resnet | gpt | resnet_cifar | vgg
  c.model.remat = False  # GPT: rematerialise block activations (GPU/TPU; no effect on XLA:CPU)
  c.model.dtype = 'float32'  # compute dtype; 'bfloat16' on GPU/TPU (params stay float32)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'digits'  # a registered dataset (docs/design.md, Data)
  c.data.dir = ''  # '' = $SIFT_DATA_DIR, else the user cache folder
  c.data.train_files = ''  # text_files: comma-separated glob patterns
  c.data.eval_files = ''  # text_files: comma-separated glob patterns of the eval split
  c.data.seq_len = 0  # text: tokens per example (0 = the model's context length)
  c.data.augment = True  # images: the dataset's standard training augmentation
  c.data.max_bytes = 20_000_000  # python_stdlib: corpus cap (about 1 s to load)
  # Images: training batches built in this many grain worker processes (the same batches);
  # 0 = one prefetch thread of the training process. Text always uses the thread.
  c.data.workers = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.max_examples = 0  # 0 = the whole eval split
  c.eval.batch_size = 0  # 0 = batch_size

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'  # sgd | adamw
  c.optim.lr = 0.1  # peak learning rate
  c.optim.schedule = 'constant'  # constant | multistep | cosine
  c.optim.warmup_steps = 0  # > 0: linear warmup over this many steps (wins over the fraction)
  c.optim.warmup_fraction = 0.0  # warmup over this fraction of total_steps (the papers' form)
  c.optim.decay_fractions = (0.3, 0.6, 0.8)  # multistep: where lr is multiplied by decay_factor
  c.optim.decay_factor = 0.2  # multistep: lr factor at each decay fraction
  c.optim.end_lr = 0.0  # cosine: final learning rate
  c.optim.momentum = 0.9  # sgd
  c.optim.nesterov = False  # sgd: Nesterov momentum
  c.optim.b1 = 0.9  # adamw
  c.optim.b2 = 0.999  # adamw: second-moment decay
  c.optim.eps = 1e-8  # adamw: denominator epsilon
  c.optim.weight_decay = 0.0  # decoupled (adamw) or coupled, before momentum (sgd)
  c.optim.decay_norm_and_bias = True  # False: no weight decay on BatchNorm/LayerNorm and biases
  c.optim.clip_norm = 0.0  # global gradient norm clip; 0 = off
  c.optim.label_smoothing = 0.0  # smoothed one-hot targets of the loss, in [0, 1)
  c.optim.grad_accum_steps = 1  # microbatches per step, gradients accumulated before the update

  c.sparsity = ml_collections.ConfigDict()
  c.sparsity.rule = 'dense'  # dense | static | set | rigl | topkast | gse | gmp
  c.sparsity.level = 0.0  # the one sparsity s
  c.sparsity.backward_level = 0.0  # Top-KAST backward-set sparsity (<= level)
  c.sparsity.distribution = 'uniform'  # uniform | erk
  c.sparsity.update_every_steps = 100  # dT
  c.sparsity.start_step = 0  # mask updates at start_step + k * update_every_steps, k >= 1
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
  c.analysis.spectral = (
    False  # spectral metrics of the masks on eval steps (docs/methods.md section 4)
  )

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 3  # keep the last K checkpoints

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = every device not used by fsdp
  c.mesh.fsdp = 1  # devices each param is sharded over (a divisor of the devices per host)
  c.mesh.fsdp_min_size = 2**14  # state leaves with fewer elements stay replicated

  # Multi-host: jax.distributed.initialize() before any device is touched. Values left at
  # their defaults come from the environment (the launcher, or a TPU/GPU cluster's own).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # True: join a cluster (auto-detected on TPU pods, SLURM)
  c.distributed.coordinator_address = ''  # host:port of process 0
  c.distributed.num_processes = 0  # hosts in the cluster (0 = from the environment)
  c.distributed.process_id = -1  # this host's index (-1 = from the environment)
  return c


def shrink_to_smoke(c: ml_collections.ConfigDict) -> None:
  """`smoke`: SMOKE_STEPS steps that still log, evaluate, checkpoint and update the masks."""
  c.total_steps = SMOKE_STEPS
  c.log_every_steps = SMOKE_STEPS // 3
  c.eval_every_steps = c.checkpoint_every_steps = SMOKE_STEPS
  c.eval.max_examples = 128
  c.optim.warmup_steps = min(c.optim.warmup_steps, SMOKE_STEPS)
  c.sparsity.start_step = 0
  c.sparsity.update_every_steps = c.sparsity.topkast_every_steps = SMOKE_STEPS // 3


def apply_short_forms(c: ml_collections.ConfigDict, args: dict[str, str | bool]) -> None:
  """Applies `smoke`, `sift=`, `sparsity=`, `rule=`, `seed=` to a config in place."""
  if args.get('smoke'):
    shrink_to_smoke(c)
  if 'seed' in args:
    c.seed = _number(args, 'seed', int, 'an integer')
  if 'sift' in args:
    c.sift.name = str(args['sift'])
  if 'sparsity' in args:
    c.sparsity.level = _number(args, 'sparsity', float, 'a number in [0, 1)')
    if 'rule' not in args and c.sparsity.rule == 'dense':
      c.sparsity.rule = 'static'
  if 'rule' in args:
    c.sparsity.rule = str(args['rule'])
  if c.sparsity.rule == 'dense' and c.sparsity.level > 0:
    importlib.import_module('sift_jax.sparsity')  # registers the rules
    rules = importlib.import_module('sift_jax.registry').RULES
    sparse = ', '.join(n for n in rules.names() if rules.get(n).has_masks)
    raise ConfigError(
      f'rule=dense with sparsity={c.sparsity.level}: a dense run has no sparsity; '
      f'pick a rule ({sparse}) or drop sparsity='
    )


def _number(args: dict[str, str | bool], key: str, kind: type, allowed: str) -> int | float:
  """args[key] as `kind`, or a ConfigError naming the value and what is allowed."""
  try:
    return kind(args[key])
  except ValueError:
    raise ConfigError(f'config argument {key}={args[key]!r} is not {allowed}') from None


def known_configs() -> list[str]:
  """The shipped config files, as `configs/<file>.py`."""
  return sorted(CONFIG_PREFIX + p.name for p in CONFIG_DIR.glob('*.py'))


def resolve_config_path(path: str) -> str:
  """`path` when it is a file; else `configs/<file>.py` (or `<file>.py`) from the shipped configs."""
  if os.path.isfile(path):
    return path
  shipped = CONFIG_DIR / path.removeprefix(CONFIG_PREFIX)
  if not os.path.isabs(path) and shipped.is_file():
    return str(shipped)
  names = [os.path.basename(k) for k in known_configs()]
  close = difflib.get_close_matches(os.path.basename(path), names, n=1)
  hint = f'did you mean {CONFIG_PREFIX}{close[0]}? ' if close else ''
  raise ConfigError(
    f'config file {path!r} does not exist (relative to {os.getcwd()} or the shipped configs); '
    f'{hint}shipped: {", ".join(known_configs())}'
  )


def exec_file(path: str, module_name: str, what: str):
  """The module a Python file (a config or sweep file) defines; a syntax error in it is a
  ConfigError naming the file and line, not a traceback into the loader."""
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'{what} {path} has a syntax error at line {e.lineno}: {e.msg}') from None
  return module


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads `get_config(arg)` from a config file (for notebooks, tests, derived configs).

  `path` is a file path, or `configs/<file>.py` of the shipped configs from any directory.
  """
  path = resolve_config_path(path)
  name = 'sift_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  module = exec_file(path, name, 'config file')
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} defines no get_config(arg)')
  # As ml_collections' config_flags: no argument when the command line gives none.
  return module.get_config() if arg is None else module.get_config(arg)


def join_arg(args: dict[str, str | bool]) -> str:
  """The inverse of `parse_arg`."""
  parts = ['smoke'] if args.get('smoke') else ['local'] if args.get('local') else []
  parts += [f'{k}={v}' for k, v in args.items() if k not in FLAG_ARGS]
  return ','.join(parts)


def _tuples(value):
  """JSON lists back to the tuples the config files use (block_shape, hidden, ...)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was started with (its config.json)."""
  path = os.path.join(workdir, SAVED_CONFIG)
  if not os.path.isfile(path):
    raise ConfigError(
      f'{path} does not exist: --workdir alone works for a folder a run has written; '
      'otherwise give --config=configs/<file>.py'
    )
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} is unreadable ({e}); give --config=configs/<file>.py') from e
  return ml_collections.ConfigDict(_tuples(saved))


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
  """Raises ConfigError naming the closest existing key when dotted `key` is not in config."""
  node = config
  for depth, part in enumerate(key.split('.')):
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node = node[part]
      continue
    known = sorted(flat_keys(config))
    close = difflib.get_close_matches(key, known, n=1)
    hint = f'; did you mean --config.{close[0]}?' if close else ''
    group = '.'.join(key.split('.')[:depth]) or 'the config'
    raise ConfigError(f'unknown config key --config.{key}: {group} has no {part!r}{hint}')


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}, for nested dicts (a config's JSON) and ConfigDicts alike."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def flat_keys(config: ml_collections.ConfigDict) -> list[str]:
  """Every leaf key of config, dotted ('optim.lr')."""
  return list(flatten(config))


def config_value(config: ml_collections.ConfigDict, key: str):
  """config['a.b'] for a dotted key."""
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _flag_value(argv: list[str], name: str) -> tuple[str | None, list[str]]:
  """The value of `--name=V` / `--name V` in argv, and argv without it."""
  rest, value, i = [], None, 0
  while i < len(argv):
    a = argv[i]
    if a == f'--{name}' and i + 1 < len(argv):
      value, i = argv[i + 1], i + 2
      continue
    if a.startswith(f'--{name}='):
      value = a.split('=', 1)[1]
    else:
      rest.append(a)
    i += 1
  return value, rest


def config_from_argv(
  argv: list[str], *, from_workdir: bool = False
) -> tuple[ml_collections.ConfigDict, str, list[str]]:
  """Loads the config a command line names, checks its `--config.<key>` overrides.

  `--config=<file>.py[:arg]` (any directory, see resolve_config_path), or with
  `from_workdir`, no --config and `--workdir=DIR` holding a run's config.json. Returns the
  config, the --config value ('' when it came from the workdir) and argv without --config, for
  `config_flags.DEFINE_config_dict`, which applies the overrides.
  """
  spec, rest = _flag_value(argv, 'config')
  if not spec and any(a.startswith(('--help', '-h', '-?')) for a in argv[1:]):
    return base_config(), '', rest  # --help needs no config
  if spec:
    path, _, arg = spec.partition(':')
    config = load_config(path, arg or None)
  else:
    workdir = _flag_value(argv, 'workdir')[0] if from_workdir else None
    if not workdir:
      also = ' (or --workdir=DIR of an earlier run)' if from_workdir else ''
      raise ConfigError(f'missing --config=configs/<file>.py[:arg]{also}')
    config, spec = load_saved_config(workdir), ''
  for a in rest:
    if a.startswith('--config.'):
      check_key(config, a[len('--config.') :].split('=', 1)[0])
  return config, spec, rest


def fail(message: str) -> NoReturn:
  """A user-facing error of a command-line tool: one line on stderr, no traceback, exit 2."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def define_config_flag(argv: list[str], *, from_workdir: bool = False) -> tuple[str, list[str]]:
  """Defines the absl flag `config` from argv (see config_from_argv); returns the --config value
  and the argv to hand to app.run. A bad config is one line on stderr and exit 2."""
  from ml_collections import config_flags

  try:
    config, spec, rest = config_from_argv(argv, from_workdir=from_workdir)
  except UserError as e:
    fail(str(e))
  config_flags.DEFINE_config_dict(
    'config', config, 'Experiment config (--config=<file>.py[:arg]).', sys_argv=rest
  )
  return spec, rest
