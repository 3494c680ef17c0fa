"""CIFAR-10, CIFAR-100 and ImageNet-2012 through `tfds.data_source` (random access, no TensorFlow).

The prepared datasets (ArrayRecord format) are read from `<data root>/tensorflow_datasets`. Prepare
them once where TensorFlow is available, e.g. `tfds build cifar100 --file_format=array_record
--data_dir=<data root>/tensorflow_datasets` (ImageNet needs the manual download of the ILSVRC2012
tars first; see the TFDS catalog page of imagenet2012).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from sift_jax.data import files
from sift_jax.data.images import (
  CIFAR10_MEAN,
  CIFAR10_STD,
  IMAGENET_SIZE,
  ImageSpec,
  register_images,
)


class TfdsSource:
  """One split of a TFDS data source; images come back as a list (ImageNet sizes vary)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def get(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    # One record at a time: the batched __getitems__ fails under tfds.testing.mock_data.
    examples = [self.source[int(i)] for i in indices]
    return [np.asarray(e['image']) for e in examples], np.array(
      [e['label'] for e in examples], np.int32
    )


def tfds_splits(
  name: str, train: str, eval_split: str, root: Path
) -> tuple[TfdsSource, TfdsSource]:
  import tensorflow_datasets as tfds

  data_dir = root / 'tensorflow_datasets'
  try:
    return tuple(
      TfdsSource(tfds.data_source(name, split=split, data_dir=str(data_dir)))
      for split in (train, eval_split)
    )
  except Exception as e:  # TFDS raises assorted errors for a missing or unprepared dataset
    raise FileNotFoundError(
      f'dataset {name!r}: tfds.data_source could not open splits {train!r}/{eval_split!r} under '
      f'{data_dir} ({type(e).__name__}: {e}). Prepare it there in ArrayRecord format, e.g. '
      f'`tfds build {name} --file_format=array_record --data_dir={data_dir}`'
    ) from e


def _register_tfds(name: str, spec: ImageSpec, eval_split: str) -> None:
  def load(config: ml_collections.ConfigDict) -> tuple[TfdsSource, TfdsSource]:
    return tfds_splits(name, 'train', eval_split, files.data_root(config))

  register_images(name, spec)(load)


_register_tfds(
  'cifar10', ImageSpec(10, (32, 32, 3), CIFAR10_MEAN, CIFAR10_STD, augment='crop_flip'), 'test'
)
_register_tfds(
  'cifar100',
  ImageSpec(100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 'crop_flip'),
  'test',
)
_register_tfds(
  'imagenet2012',
  ImageSpec(
    1000,
    (IMAGENET_SIZE, IMAGENET_SIZE, 3),
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
    'imagenet',
  ),
  'validation',
)
