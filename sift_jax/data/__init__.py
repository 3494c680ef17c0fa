"""Data pipelines: `build_dataset(config)` returns host-local, step-indexed batches.

Text: {'inputs', 'targets'} int32 (B, T). Images: {'image'} float32 (B, H, W, C), {'label'} int32
(B,). Eval batches also carry {'weights'} float32 (B,), 0 on padding rows. See base.py for the
determinism and sharding contract, text.py / images.py / tfds_images.py for each dataset.
"""

from __future__ import annotations

import ml_collections

from sift_jax import registry
from sift_jax.data import images, text, tfds_images  # noqa: F401  (they register the datasets)
from sift_jax.data.base import METAS, Batch, Dataset

__all__ = ['Batch', 'Dataset', 'build_dataset', 'dataset_meta']


def build_dataset(
  config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> Dataset:
  """The dataset `config.data.name`, as seen by process `process_index` of `process_count`;
  raises ConfigError when a batch size exceeds its split."""
  build = registry.DATASETS.get(config.data.name)
  dataset = build(config, process_index=process_index, process_count=process_count)
  dataset.check_batch_sizes()
  return dataset


def dataset_meta(config: ml_collections.ConfigDict) -> dict:
  """`build_dataset(config).meta` (what the model is sized by: vocab_size and seq_len, or
  num_classes and image_shape), without loading the data when the dataset's registration knows
  it: the command-line tools describe the model a config trains without reading the corpus."""
  build = registry.DATASETS.get(config.data.name)
  meta = METAS.get(config.data.name)
  return meta(config) if meta else build(config).meta
