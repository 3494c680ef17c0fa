"""Image classification batches, and the datasets held in memory (digits, Fashion-MNIST, CIFAR-10 JPG).

Training order: epoch e is a permutation of the train split drawn from (seed, e); step t takes the
global example slots [t*B, (t+1)*B) of the concatenated epoch stream (a batch may straddle two
epochs). Augmentation (data.augment, train only) draws its randomness for the global batch from
(seed, step):
- 'crop_flip' (cifar10, cifar10_jpg, cifar100): zero-pad 4, random 32x32 crop, horizontal flip;
- 'imagenet': random resized crop (area 0.08-1, aspect 3/4-4/3) to 224 + flip; eval (and train
  without augmentation) resizes the shorter side to 256 and takes the centred 224 crop;
- 'none': digits (a mirrored digit is another symbol; 8x8 leaves no room to crop) and
  fashion_mnist (kept plain so its numbers compare with the usual MLP baselines).
Pixels are normalised per channel with each dataset's mean/std constants (in [0, 1] units).
data.workers > 0 builds the training batches in grain worker processes (pipeline.py).

Splits: digits = sklearn's load_digits, first 1500 train, last 297 eval; fashion_mnist = the IDX
train / t10k files; cifar10_jpg = the train / test folders of the archive, decoded once and cached
as .npz in the cache folder under the archive's sha256.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import ml_collections
import numpy as np
from PIL import Image

from sift_jax import registry
from sift_jax.data import augment, files, pipeline
from sift_jax.data.base import (
  EVAL_SUBSET_SEED,
  METAS,
  STREAM_AUGMENT,
  STREAM_EPOCH_PERMUTATION,
  STREAM_EVAL_SUBSET,
  Batch,
  Dataset,
  rng,
  stratified_sample,
)

CIFAR_PAD = 4
IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256
AUGMENTS = ('none', 'crop_flip', 'imagenet')
DIGITS_TRAIN = 1500


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """What a model and the preprocessing need to know about an image dataset."""

  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the batches
  mean: tuple[float, ...]  # per channel, of pixels / scale
  std: tuple[float, ...]
  augment: str = 'none'  # one of AUGMENTS
  scale: float = 255.0  # the pixel value that means 1.0

  def meta(self) -> dict:
    """What the model is sized by."""
    return {'num_classes': self.num_classes, 'image_shape': tuple(self.image_shape)}


class ImageSource(Protocol):
  """A split with random access: uint8 images (an array, or a list when sizes vary) and labels."""

  def __len__(self) -> int: ...

  def get(self, indices: np.ndarray) -> tuple[np.ndarray | Sequence[np.ndarray], np.ndarray]: ...


class ArraySource:
  """A split held in memory: uint8 images (N, H, W, C) and integer labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f'{len(images)} images but {len(labels)} labels')
    self.images = images
    self.labels = labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


class ImageDataset(Dataset):
  """Classification batches over a train and an eval source."""

  kind = 'image'

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    train: ImageSource,
    eval_source: ImageSource,
    spec: ImageSpec,
    *,
    process_index: int = 0,
    process_count: int = 1,
  ):
    super().__init__(config, process_index, process_count)
    if spec.augment not in AUGMENTS:
      raise ValueError(f'augment {spec.augment!r}; known: {", ".join(AUGMENTS)}')
    self.train_source = train
    self.eval_source = eval_source
    self.spec = spec
    self.augment = bool(config.data.augment)
    self.meta = spec.meta()
    self.num_train_examples = len(train)
    self.num_eval_examples = len(eval_source)
    self._mean = np.asarray(spec.mean, np.float32)
    self._std = np.asarray(spec.std, np.float32)
    self._perms: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      # A few recent epochs suffice (a batch spans at most two); the prefetch thread shares this.
      perm = rng(self.seed, STREAM_EPOCH_PERMUTATION, epoch).permutation(self.num_train_examples)
      self._perms = {**{e: p for e, p in self._perms.items() if e >= epoch - 2}, epoch: perm}
    return perm

  def train_indices(self, step: int) -> np.ndarray:
    """Train example indices of this host's rows of step `step`."""
    rows = self.host_rows(self.batch_size)
    slots = step * self.batch_size + np.arange(rows.start, rows.stop)
    epochs, positions = np.divmod(slots, self.num_train_examples)
    out = np.empty_like(slots)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      out[here] = self._permutation(int(epoch))[positions[here]]
    return out

  def _stack(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:  # (N, H, W, C)
    if len(images) == 0:
      return np.zeros((0, *self.spec.image_shape), np.uint8)
    return np.stack(images) if isinstance(images, Sequence) else images

  def _eval_pixels(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    if self.spec.augment == 'imagenet':
      images = [augment.resize_center_crop(im, IMAGENET_RESIZE, IMAGENET_SIZE) for im in images]
    return self._stack(images)

  def _train_pixels(self, images: np.ndarray | Sequence[np.ndarray], step: int) -> np.ndarray:
    if not self.augment or self.spec.augment == 'none':
      return self._eval_pixels(images)
    draws = rng(self.seed, STREAM_AUGMENT, step)
    rows = self.host_rows(self.batch_size)
    if self.spec.augment == 'crop_flip':
      offsets, flips = augment.crop_flip_draws(draws, self.batch_size, CIFAR_PAD)
      return augment.pad_crop_flip(self._stack(images), offsets[rows], flips[rows], CIFAR_PAD)
    uniforms, flips = augment.random_resized_crop_draws(draws, self.batch_size)
    return self._stack(
      [
        augment.random_resized_crop_flip(im, u, bool(f), IMAGENET_SIZE)
        for im, u, f in zip(images, uniforms[rows], flips[rows], strict=True)
      ]
    )

  def _batch(self, pixels: np.ndarray, labels: np.ndarray) -> Batch:
    image = augment.normalize(pixels, self._mean, self._std, self.spec.scale)  # (B, H, W, C)
    return {'image': image, 'label': np.asarray(labels, np.int32)}

  def train_batch(self, step: int) -> Batch:
    images, labels = self.train_source.get(self.train_indices(step))
    return self._batch(self._train_pixels(images, step), labels)

  def train_iterator(self, start_step: int, prefetch: int = 3) -> Iterator[Batch]:
    """As Dataset.train_iterator; with data.workers > 0 the batches (the same ones) are built in
    that many grain worker processes (pipeline.py)."""
    if not self.workers:
      return super().train_iterator(start_step, prefetch)
    return pipeline.grain_train_iterator(self.train_batch, start_step, self.workers, prefetch)

  def _eval_subset(self, n: int, k: int) -> np.ndarray:
    labels = getattr(self.eval_source, 'labels', None)
    if labels is None:  # reading every label of a TFDS split would decode every image
      return super()._eval_subset(n, k)
    return stratified_sample(labels, k, rng(EVAL_SUBSET_SEED, STREAM_EVAL_SUBSET, 0))

  def _eval_rows(self, indices: np.ndarray) -> Batch:
    images, labels = self.eval_source.get(indices)
    return self._batch(self._eval_pixels(images), labels)


Loader = Callable[[ml_collections.ConfigDict], tuple[ImageSource, ImageSource]]


def register_images(name: str, spec: ImageSpec) -> Callable[[Loader], Loader]:
  """Registers a loader, (config) -> (train source, eval source), as an image dataset."""

  def wrap(load: Loader) -> Loader:
    @registry.DATASETS.register(name)
    def build(
      config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
    ) -> ImageDataset:
      train, eval_source = load(config)
      return ImageDataset(
        config,
        train,
        eval_source,
        spec,
        process_index=process_index,
        process_count=process_count,
      )

    METAS[name] = lambda config: spec.meta()
    return load

  return wrap


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[ArraySource, ArraySource]:
  from sklearn.datasets import load_digits

  d = load_digits()
  images = d.images.astype(np.uint8)[..., None]  # (1797, 8, 8, 1), values 0..16
  return (
    ArraySource(images[:DIGITS_TRAIN], d.target[:DIGITS_TRAIN]),
    ArraySource(images[DIGITS_TRAIN:], d.target[DIGITS_TRAIN:]),
  )


@register_images('digits', ImageSpec(10, (8, 8, 1), (0.3051,), (0.3750,), scale=16.0))
def load_digits(config: ml_collections.ConfigDict) -> tuple[ArraySource, ArraySource]:
  return _digits()


def parse_idx(data: bytes, name: str) -> np.ndarray:
  """An IDX array (the MNIST file format) of unsigned bytes."""
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] != 0x08:
    raise ValueError(f'{name}: not an IDX file of unsigned bytes (header {data[:4]!r})')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise ValueError(f'{name}: IDX header says shape {shape} but holds {body.size} values')
  return body.reshape(shape)


@functools.lru_cache(maxsize=2)
def _fashion_mnist(root: Path) -> tuple[ArraySource, ArraySource]:
  arrays = [
    parse_idx(files.read_pinned('fashion_mnist', pin, root), pin.relpath)
    for pin in files.PINS['fashion_mnist']
  ]
  train_x, train_y, test_x, test_y = arrays
  return ArraySource(train_x[..., None], train_y), ArraySource(test_x[..., None], test_y)


@register_images('fashion_mnist', ImageSpec(10, (28, 28, 1), (0.2860,), (0.3530,)))
def load_fashion_mnist(config: ml_collections.ConfigDict) -> tuple[ArraySource, ArraySource]:
  return _fashion_mnist(files.data_root(config))


def decode_jpg_archive(path: Path) -> dict[str, np.ndarray]:
  """{split}_x uint8 (N, H, W, 3) and {split}_y int32 (N,) from a tar.gz laid out as
  <split>/<class>/<name>.jpg; examples sorted by path, labels index the sorted class names."""
  found: dict[str, list[tuple[str, str, np.ndarray]]] = {}
  with tarfile.open(path, 'r:gz') as archive:
    for member in archive:
      parts = Path(member.name).parts
      if not member.isfile() or len(parts) != 3 or not parts[2].lower().endswith('.jpg'):
        continue
      pixels = np.asarray(Image.open(io.BytesIO(archive.extractfile(member).read())).convert('RGB'))
      found.setdefault(parts[0], []).append((member.name, parts[1], pixels))
  if not found:
    raise ValueError(f'{path}: no <split>/<class>/<name>.jpg images inside')
  classes = sorted({c for examples in found.values() for _, c, _ in examples})
  out = {}
  for split, examples in found.items():
    examples.sort(key=lambda e: e[0])
    out[f'{split}_x'] = np.stack([e[2] for e in examples])
    out[f'{split}_y'] = np.array([classes.index(e[1]) for e in examples], np.int32)
  return out


def _load_npz(path: Path) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}  # reads (and CRC-checks) every array now


@functools.lru_cache(maxsize=1)
def _cifar10_jpg(root: Path) -> tuple[ArraySource, ArraySource]:
  pin = files.PINS['cifar10_jpg'][0]
  path = files.pinned_path('cifar10_jpg', pin, root)

  def build(cached: Path) -> None:
    tmp = cached.with_name(f'{cached.stem}.part.npz')
    np.savez(tmp, **decode_jpg_archive(path))
    tmp.replace(cached)

  z = files.load_cache(files.cache_dir() / 'cifar10_jpg' / f'{pin.sha256}.npz', _load_npz, build)
  return ArraySource(z['train_x'], z['train_y']), ArraySource(z['test_x'], z['test_y'])


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@register_images(
  'cifar10_jpg', ImageSpec(10, (32, 32, 3), CIFAR10_MEAN, CIFAR10_STD, augment='crop_flip')
)
def load_cifar10_jpg(config: ml_collections.ConfigDict) -> tuple[ArraySource, ArraySource]:
  return _cifar10_jpg(files.data_root(config))
