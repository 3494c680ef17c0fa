"""Model construction from the run config: the registered models, their keys, presets, sizes.

`build_model(config, meta)` reads `config.model` (keys below; missing keys take the defaults of
`MODEL_DEFAULTS`, unknown keys are an error) and `config.sift` (through the layer factory).
`meta` comes from the data: text {'vocab_size', 'seq_len'}, image {'num_classes', 'image_shape'}.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sift_jax.models import cifar, layers
from sift_jax.models.gpt import GPT
from sift_jax.models.layers import sparse_kernel_paths
from sift_jax.models.mlp import MLP
from sift_jax.models.resnet import STAGE_BLOCKS, STEMS, ResNet
from sift_jax.registry import MODELS
from sift_jax.sparse_layers import conv

__all__ = [
  'MODEL_DEFAULTS',
  'build_model',
  'count_params',
  'example_input',
  'gpt_preset',
  'model_config',
  'register_model',
  'resolved',
  'sparse_kernel_paths',
]

COMMON_DEFAULTS: dict[str, Any] = {'remat': False, 'dtype': 'float32'}
# Each model's own config.model keys and defaults, filled by `register_model`.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
TEXT_MODELS = ('gpt',)
REMAT_MODELS = ('gpt',)  # the models whose blocks honour model.remat
ModelBuilder = Callable[[ml_collections.ConfigDict, Mapping[str, Any]], nn.Module]

GPT_PRESETS: dict[str, dict[str, int]] = {
  # GPT-3 Small (Brown et al. 2020, table 2.1); 124-126M parameters with the 50257 BPE vocabulary.
  'gpt3_small': {
    'num_layers': 12,
    'd_model': 768,
    'num_heads': 12,
    'd_ff': 3072,
    'context_length': 1024,
  },
  'gpt3_medium': {
    'num_layers': 24,
    'd_model': 1024,
    'num_heads': 16,
    'd_ff': 4096,
    'context_length': 1024,
  },
  # A CPU-sized GPT for `local` runs on the byte-level corpus.
  'gpt_tiny': {
    'num_layers': 2,
    'd_model': 64,
    'num_heads': 4,
    'd_ff': 256,
    'context_length': 128,
  },
}


def gpt_preset(name: str) -> dict[str, int]:
  """Architecture keys of a named GPT size, to update `config.model` with (vocab is the data's)."""
  if name not in GPT_PRESETS:
    raise ValueError(f'unknown GPT preset {name!r}; known: {", ".join(sorted(GPT_PRESETS))}')
  return dict(GPT_PRESETS[name])


def register_model(
  name: str, defaults: Mapping[str, Any] | None = None
) -> Callable[[ModelBuilder], ModelBuilder]:
  """Registers `build(config, meta) -> nn.Module` as model `name` with its `config.model` keys.

  `defaults` are the model's own keys and default values (beside `remat` and `dtype`); the
  builder reads the resolved group with `resolved(config)`.
  """

  def add(build: ModelBuilder) -> ModelBuilder:
    MODELS.register(name)(build)
    MODEL_DEFAULTS[name] = dict(defaults or {})
    return build

  return add


def _defaults(name: str) -> dict[str, Any]:
  """The model's own keys and defaults; an unknown name raises the registry's error."""
  MODELS.get(name)
  return {**COMMON_DEFAULTS, **MODEL_DEFAULTS.get(name, {})}


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """A complete `config.model` group for model `name`: defaults, then `overrides`."""
  group = ml_collections.ConfigDict({'name': name, **_defaults(name)})
  group.update(overrides)
  return group


def resolved(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.model over its defaults; an unknown key or a bad value raises ValueError."""
  name = config.model.name
  defaults = _defaults(name)
  allowed = {'name', *defaults}
  given = dict(config.model)
  unknown = sorted(set(given) - allowed)
  if unknown:
    raise ValueError(
      f'unknown model key(s) {unknown} for model {name!r}; allowed: {", ".join(sorted(allowed))}'
    )
  m = {**defaults, **given}
  if m['remat'] and name not in REMAT_MODELS:
    raise ValueError(
      f'model.remat=True, but model {name!r} has no rematerialisation; '
      f'models with it: {", ".join(REMAT_MODELS)}'
    )
  if m['dtype'] not in DTYPES:
    raise ValueError(f'model.dtype {m["dtype"]!r}; allowed: {", ".join(DTYPES)}')
  return m


def _require_meta(meta: Mapping[str, Any], keys: tuple[str, ...], model: str) -> None:
  missing = [k for k in keys if k not in meta]
  if missing:
    raise ValueError(f'model {model!r} needs data meta keys {missing}; got {sorted(meta)}')


def _positive(name: str, value: Any) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
  return int(value)


@register_model(
  'gpt',
  {
    'num_layers': 12,
    'd_model': 768,
    'num_heads': 12,
    'd_ff': 0,  # 0 = 4 * d_model
    'context_length': 1024,
    'dropout': 0.1,
    'init_std': 0.02,
  },
)
def _build_gpt(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> nn.Module:
  m = resolved(config)
  _require_meta(meta, ('vocab_size', 'seq_len'), 'gpt')
  heads = _positive('model.num_heads', m['num_heads'])
  base_d = _positive('model.d_model', m['d_model'])
  if base_d % heads:
    raise ValueError(f'model.d_model {base_d} is not a multiple of model.num_heads {heads}')
  if m['d_ff'] != 0:
    _positive('model.d_ff (0 = 4 * d_model)', m['d_ff'])
  context = _positive('model.context_length', m['context_length'])
  if m['remat'] and jax.default_backend() == 'cpu':
    warnings.warn(
      'model.remat=True saves no memory on the CPU backend: XLA:CPU drops the rematerialisation '
      'barriers and merges the recomputed forward with the original, so the compiled step keeps '
      'as many temporaries as without remat (benchmarks/sift_step_time.py --remat: 2.29x the dense '
      'footprint, 2.28x without; tests/test_models.py checks it). It is meant for GPU/TPU (not '
      'measured here).',
      stacklevel=2,
    )
  if meta['seq_len'] > context:
    raise ValueError(f'data seq_len {meta["seq_len"]} exceeds model.context_length {context}')
  if not 0.0 <= m['dropout'] < 1.0:
    raise ValueError(f'model.dropout must be in [0, 1), got {m["dropout"]!r}')
  d_model = layers.scale_width(config, base_d, multiple_of=heads)
  # Sparse Wide keeps the ratio d_ff / d_model (GPT-3 Small: 3072 -> 4368 with d_model 1092).
  d_ff = 4 * d_model if m['d_ff'] == 0 else -(-m['d_ff'] * d_model // base_d)
  return GPT(
    config=ml_collections.FrozenConfigDict(config),
    vocab_size=_positive('meta vocab_size', meta['vocab_size']),
    num_layers=_positive('model.num_layers', m['num_layers']),
    d_model=d_model,
    d_ff=d_ff,
    num_heads=heads,
    context_length=context,
    dropout=float(m['dropout']),
    init_std=float(m['init_std']),
    remat=bool(m['remat']),
    dtype=DTYPES[m['dtype']],
  )


@register_model('resnet', {'depth': 18, 'stem': 'cifar', 'width': 64, 'conv_impl': 'auto'})
def _build_resnet(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> nn.Module:
  m = resolved(config)
  _require_meta(meta, ('num_classes', 'image_shape'), 'resnet')
  if m['depth'] not in STAGE_BLOCKS:
    raise ValueError(f'model.depth {m["depth"]!r}; allowed: {", ".join(map(str, STAGE_BLOCKS))}')
  if m['stem'] not in STEMS:
    raise ValueError(f'model.stem {m["stem"]!r}; allowed: {", ".join(STEMS)}')
  width = _positive('model.width', m['width'])
  return ResNet(
    config=ml_collections.FrozenConfigDict(config),
    num_classes=_positive('meta num_classes', meta['num_classes']),
    stage_blocks=STAGE_BLOCKS[m['depth']],
    stem=m['stem'],
    # The original code widens the base width, then doubles it per stage (90, 180, 360, 720).
    widths=tuple(layers.scale_width(config, width) * 2**i for i in range(4)),
    dtype=DTYPES[m['dtype']],
    conv_impl=conv.resolve_impl(m['conv_impl']),
  )


@register_model('mlp', {'hidden': (256, 256)})
def _build_mlp(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> nn.Module:
  m = resolved(config)
  _require_meta(meta, ('num_classes', 'image_shape'), 'mlp')
  hidden = tuple(
    layers.scale_width(config, _positive('model.hidden entry', w)) for w in m['hidden']
  )
  return MLP(
    config=ml_collections.FrozenConfigDict(config),
    num_classes=_positive('meta num_classes', meta['num_classes']),
    hidden=hidden,
    dtype=DTYPES[m['dtype']],
  )


def _cifar_common(config: ml_collections.ConfigDict, meta: Mapping[str, Any], table: dict):
  """Resolved keys of a cifar.py model, with its depth, width and init checked."""
  m = resolved(config)
  _require_meta(meta, ('num_classes', 'image_shape'), config.model.name)
  if m['depth'] not in table:
    raise ValueError(f'model.depth {m["depth"]!r}; allowed: {", ".join(map(str, table))}')
  if m['kernel_init'] not in cifar.KERNEL_INITS:
    raise ValueError(
      f'model.kernel_init {m["kernel_init"]!r}; allowed: {", ".join(cifar.KERNEL_INITS)}'
    )
  return m, dict(
    config=ml_collections.FrozenConfigDict(config),
    num_classes=_positive('meta num_classes', meta['num_classes']),
    kernel_init=cifar.KERNEL_INITS[m['kernel_init']],
    sparse_ends=bool(m['sparse_ends']),
    dtype=DTYPES[m['dtype']],
  )


@register_model(
  'resnet_cifar', {'depth': 56, 'width': 16, 'kernel_init': 'he_normal', 'sparse_ends': False}
)
def _build_resnet_cifar(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> nn.Module:
  m, common = _cifar_common(config, meta, cifar.RESNET_DEPTHS)
  w = layers.scale_width(config, _positive('model.width', m['width']))
  return cifar.CifarResNet(
    blocks=cifar.RESNET_DEPTHS[m['depth']], widths=(w, 2 * w, 4 * w), **common
  )


@register_model(
  'vgg',
  {'depth': 16, 'width': 16, 'dropout': 0.5, 'kernel_init': 'he_normal', 'sparse_ends': False},
)
def _build_vgg(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> nn.Module:
  m, common = _cifar_common(config, meta, cifar.VGG_STAGES)
  w = layers.scale_width(config, _positive('model.width', m['width']))
  if not 0.0 <= m['dropout'] < 1.0:
    raise ValueError(f'model.dropout must be in [0, 1), got {m["dropout"]!r}')
  return cifar.VGG(
    stages=cifar.VGG_STAGES[m['depth']],
    widths=(w, 2 * w, 4 * w, 8 * w, 8 * w),
    hidden=32 * w,  # 512 at the paper's width 16
    dropout=float(m['dropout']),
    **common,
  )


def build_model(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> nn.Module:
  """The model named by config.model.name, sized by config.model, the data meta and config.sift.

  Call: model.apply(variables, x, train=bool, rngs={'dropout': key}, mutable=[...]).
  """
  return MODELS.get(config.model.name)(config, meta)


def example_input(
  config: ml_collections.ConfigDict, meta: Mapping[str, Any], batch_size: int = 1
) -> jax.ShapeDtypeStruct:
  """The abstract input of a batch: int32 (B, T) tokens, or float32 (B, H, W, C) images."""
  if config.model.name in TEXT_MODELS:
    _require_meta(meta, ('seq_len',), config.model.name)
    return jax.ShapeDtypeStruct((batch_size, int(meta['seq_len'])), jnp.int32)
  _require_meta(meta, ('image_shape',), config.model.name)
  return jax.ShapeDtypeStruct((batch_size, *map(int, meta['image_shape'])), jnp.float32)


def abstract_variables(
  model: nn.Module, config: ml_collections.ConfigDict, meta: Mapping[str, Any]
) -> dict[str, Any]:
  """The variables of `model.init` as ShapeDtypeStructs (nothing is allocated)."""
  x = example_input(config, meta)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  return jax.eval_shape(lambda: model.init(rngs, jnp.zeros(x.shape, x.dtype), train=False))


def count_params(
  model: nn.Module, config: ml_collections.ConfigDict, meta: Mapping[str, Any]
) -> int:
  """Number of trainable parameters (the 'params' collection), from shapes only."""
  params = abstract_variables(model, config, meta)['params']
  return int(sum(np.prod(p.shape, dtype=np.int64) for p in jax.tree_util.tree_leaves(params)))
