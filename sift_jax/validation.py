"""Checks of a run's config before any work: the names it holds, value ranges, and the size of
a block-sparse program. Called by the trainer (experiment.validate_config), preflight and the
sweep (every run at --dry_run); errors are config_lib.ConfigError naming the value and what is
allowed. Above config_lib, data, models and sparsity (it builds the model on abstract params).
"""

from __future__ import annotations

import difflib
import importlib

import ml_collections

from sift_jax import data, models, registry
from sift_jax.config_lib import ConfigError, config_value
from sift_jax.sift import match
from sift_jax.sparse_layers import sparse_kernel_paths
from sift_jax.sparsity import plan

# Config keys that name a registry entry, and the module whose import fills that registry.
NAMED_KEYS = (
  ('model.name', 'MODELS', 'sift_jax.models'),
  ('data.name', 'DATASETS', 'sift_jax.data'),
  ('optim.name', 'OPTIMIZERS', 'sift_jax.optim'),
  ('sparsity.rule', 'RULES', 'sift_jax.sparsity'),
  ('sparsity.distribution', 'DISTRIBUTIONS', 'sift_jax.sparsity'),
  ('sift.name', 'SIFT_MEMBERS', 'sift_jax.sift'),
)
# Block-sparse execution unrolls one gather per stored block of a block-column (K of them,
# sparse_layers/block.py), so its program, and XLA's compile time, grow linearly in K: measured on
# XLA:CPU, about 0.06 s per block per kernel for the forward and backward pass (K = 256: 16 s
# for one kernel; block_shape (1, 1) on a 784-row kernel at s = 0.5 has K = 392).
MAX_BLOCKS_PER_COLUMN = 128


def validate(config: ml_collections.ConfigDict, meta: dict | None = None) -> None:
  """Checks a config before any work, raising ConfigError naming the value and what is allowed:
  the names it holds (model, dataset, optimizer, rule, distribution, member), the ranges of
  optim.label_smoothing and the sparsity levels, and under block-sparse execution the blocks each
  kernel keeps per block-column (the rule is built on abstract params; `meta`, the dataset's, is
  looked up from the config when not given). Batch sizes against the split sizes are checked when
  the dataset is built (data.build_dataset)."""
  for key, registry_name, module in NAMED_KEYS:
    table = getattr(registry, registry_name)
    importlib.import_module(module)
    value = config_value(config, key)
    if value not in table:
      close = difflib.get_close_matches(str(value), table.names(), n=1)
      hint = f'; did you mean {close[0]!r}?' if close else ''
      raise ConfigError(f'{key}={value!r} is unknown; known: {", ".join(table.names())}{hint}')
  smoothing = config.optim.label_smoothing
  if not 0.0 <= smoothing < 1.0:
    raise ConfigError(
      f'optim.label_smoothing={smoothing} is outside [0, 1): at 1 every target is uniform (nothing '
      'to learn), above 1 the loss rewards the wrong classes'
    )
  for key in ('sparsity.level', 'sparsity.backward_level'):
    if not 0.0 <= config_value(config, key) < 1.0:
      raise ConfigError(f'{key}={config_value(config, key)} is outside [0, 1)')
  if (
    config.sparsity.get('execution', 'masked') == 'block_sparse' and config.sparsity.rule != 'dense'
  ):
    _check_block_program(config, meta)


def _check_block_program(config: ml_collections.ConfigDict, meta: dict | None) -> None:
  """Refuses a block shape that stores more than MAX_BLOCKS_PER_COLUMN blocks per block-column."""
  s = config.sparsity
  if meta is None:
    try:
      meta = data.dataset_meta(config)
    except FileNotFoundError:  # no data files here (a sweep listed on a login node, say):
      return  # the trainer checks it with its dataset's meta
  variables = models.abstract_variables(models.build_model(config, meta), config, meta)
  # Top-KAST stores its backward set; the others their masks, at the level a member solves for.
  level = s.backward_level if s.rule == 'topkast' else match.mask_level(config, meta)
  layers = plan.make_plan(
    variables['params'],
    float(level),
    s.distribution,
    sparse_kernel_paths(variables),
    s.overrides,
    float(s.power_scale),
    tuple(int(b) for b in s.block_shape),
    balanced=True,
  )
  # Only 2-D (Dense) kernels run block-sparse; the execution refuses the others by name.
  per_column = [
    (layer, layer.active_blocks // layer.columns) for layer in layers if len(layer.shape) == 2
  ]
  over = [(layer, k) for layer, k in per_column if k > MAX_BLOCKS_PER_COLUMN]
  if over:
    named = ', '.join(f'{layer.name} {layer.shape}: K={k}' for layer, k in over)
    raise ConfigError(
      f'sparsity.block_shape={tuple(s.block_shape)} under sparsity.execution=block_sparse keeps '
      f'K blocks per block-column ({named}); the program unrolls one gather per block, so its '
      f'size and compile time grow with K: allowed K <= {MAX_BLOCKS_PER_COLUMN}. Use taller '
      'blocks (K = round((1 - s) * rows / block rows)) or sparsity.execution=masked'
    )
