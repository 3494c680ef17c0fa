"""The FLOP report of the model a config trains: per-layer forward FLOPs, parameters, the
Sparse-IFT member against its dense original, and training FLOPs per example, all from shapes.

  python -m sift_jax.model_report --config=configs/gpt_small_wide.py:local

The model is sized by the config's dataset (vocabulary, classes, image shape) exactly as the
trainer sizes it, without loading the data. A command-line entry point, like main and sweep: it
sits above flops, sift and sparsity, so none of them imports it.
"""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags

from sift_jax import config_lib, data, flops, models, sparsity
from sift_jax.sift import match
from sift_jax.sift import report as sift_report


def describe(config: ml_collections.ConfigDict) -> str:
  """The per-layer table, parameter count, Sparse-IFT ratios and training FLOPs of the model
  `config` trains (sized by its dataset's meta, as the trainer sizes it)."""
  meta = data.dataset_meta(config)
  model = models.build_model(config, meta)
  level = match.mask_level(config, meta)  # solved with sift.match_flops
  densities = flops.plan_densities(model, config, meta, level)  # as the masks realise them
  report = flops.count_forward_flops(model, config, meta, densities)
  lines = [flops.format_table(report), f'params: {models.count_params(model, config, meta):,}']
  if config.sift.name != 'dense':
    r = sift_report.sift_flops(config, meta)
    lines.append(
      f'sift {r.name} at s={r.level:g} (masks at s={r.mask_level:.4f}) vs the dense model: '
      f'params {r.params / r.dense_params:.3f}x, active {r.active_params / r.dense_params:.3f}x, '
      f'forward {r.forward / r.dense_forward:.4f}x, '
      f'transformed layers {r.transformed / r.dense_transformed:.4f}x'
    )
  variables = models.abstract_variables(model, config, meta)
  rule = sparsity.make_rule(config, variables['params'], models.sparse_kernel_paths(variables))
  train = flops.training_flops_per_example(rule, report, densities, step=0)
  lines.append(f'training GFLOPs per example ({config.sparsity.rule}): {train / 1e9:.4f}')
  return '\n'.join(lines)


if __name__ == '__main__':
  # Flags are defined here, not at import, so importing this module defines no global flags.
  _, _argv = config_lib.define_config_flag(sys.argv)
  app.run(lambda argv: print(describe(flags.FLAGS.config)), argv=_argv)
