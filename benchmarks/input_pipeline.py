"""Input-pipeline throughput on ImageNet-shaped JPEGs: today's prefetch thread against grain workers.

  python benchmarks/input_pipeline.py                          # thread, 1 and 2 grain workers
  python benchmarks/input_pipeline.py --workers=1,2,4 --batch_size=128 --windows=3

The JPEGs are made at run time (--images of --width x --height, alternately landscape and
portrait: a random coarse image upscaled bicubically plus pixel noise, so they carry texture
and compress about like photos) and held encoded in memory; a read decodes them with PIL, as
TFDS's ImageNet source does. Every pipeline builds the same ImageNet training batches
(random-resized crop to 224, flip, normalisation: images.py's 'imagenet' augmentation) through
`ImageDataset.train_iterator`, with `data.workers` = 0 (today's thread) or N (grain). Nothing
trains: this is pipeline-only examples/s. For each window and each pipeline in turns, a fresh
iterator starts at step 0, yields --warmup batches (worker start-up) and then --batches timed
ones; the median over --windows is printed with its ratio over the thread.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sift_jax import config_lib  # noqa: E402
from sift_jax.data import images  # noqa: E402

_WORKERS = flags.DEFINE_list('workers', ['1', '2'], 'Grain worker counts timed beside the thread.')
_IMAGES = flags.DEFINE_integer('images', 256, 'Distinct JPEGs (the epoch the batches cycle over).')
_WIDTH = flags.DEFINE_integer('width', 400, 'JPEG width (ImageNet averages about 400 x 350).')
_HEIGHT = flags.DEFINE_integer('height', 350, 'JPEG height.')
_QUALITY = flags.DEFINE_integer('quality', 90, 'JPEG quality.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Examples per batch.')
_BATCHES = flags.DEFINE_integer('batches', 16, 'Timed batches per window.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Batches taken before timing (worker start-up).')
_WINDOWS = flags.DEFINE_integer('windows', 2, 'Timing windows; the median is reported.')

SPEC = images.ImageSpec(
  1000,
  (images.IMAGENET_SIZE, images.IMAGENET_SIZE, 3),
  (0.485, 0.456, 0.406),
  (0.229, 0.224, 0.225),
  'imagenet',
)


class JpegSource:
  """Encoded JPEGs, decoded on every read (images.ImageSource)."""

  def __init__(self, jpegs: list[bytes], labels: np.ndarray):
    self.jpegs = jpegs
    self.labels = labels

  def __len__(self) -> int:
    return len(self.jpegs)

  def get(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    pixels = [np.asarray(Image.open(io.BytesIO(self.jpegs[i])).convert('RGB')) for i in indices]
    return pixels, self.labels[indices]


def make_jpegs(n: int, width: int, height: int, quality: int) -> list[bytes]:
  generator = np.random.default_rng(0)
  out = []
  for i in range(n):
    w, h = (width, height) if i % 2 == 0 else (height, width)
    coarse = generator.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
    noisy = smooth + generator.integers(-12, 13, smooth.shape, dtype=np.int16)  # (h, w, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=quality)
    out.append(buffer.getvalue())
  return out


def examples_per_s(source: JpegSource, workers: int) -> float:
  """Pipeline-only examples/s of one fresh iterator with `data.workers` = workers."""
  c = config_lib.base_config()
  c.batch_size = _BATCH.value
  c.data.workers = workers
  dataset = images.ImageDataset(c, source, source, SPEC)
  batches = dataset.train_iterator(0)
  try:
    for _ in range(_WARMUP.value):
      next(batches)
    t = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(batches)
    return _BATCHES.value * _BATCH.value / (time.perf_counter() - t)
  finally:
    batches.close()


def main(argv):
  del argv
  counts = [0] + [int(w) for w in _WORKERS.value]
  if any(w < 1 for w in counts[1:]):
    raise app.UsageError(f'--workers={",".join(_WORKERS.value)}: grain worker counts are >= 1')
  jpegs = make_jpegs(_IMAGES.value, _WIDTH.value, _HEIGHT.value, _QUALITY.value)
  labels = np.arange(len(jpegs), dtype=np.int32) % SPEC.num_classes
  source = JpegSource(jpegs, labels)
  print(
    f'{len(jpegs)} JPEGs of {_WIDTH.value}x{_HEIGHT.value} (quality {_QUALITY.value}, '
    f'{np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB on average), batch {_BATCH.value}, '
    f'random-resized crop to {images.IMAGENET_SIZE} + flip; median of {_WINDOWS.value} windows '
    f'of {_BATCHES.value} batches after {_WARMUP.value}; {os.cpu_count()} CPUs',
    flush=True,
  )
  rates = {w: [] for w in counts}
  for _ in range(_WINDOWS.value):
    for w in counts:
      rates[w].append(examples_per_s(source, w))
  today = statistics.median(rates[0])
  print(f'{"pipeline":<22} {"examples/s":>11} {"over today":>11}')
  for w in counts:
    name = 'thread (today)' if w == 0 else f'grain, {w} worker{"s" if w > 1 else ""}'
    rate = statistics.median(rates[w])
    print(f'{name:<22} {rate:11.1f} {rate / today:10.2f}x', flush=True)


if __name__ == '__main__':
  app.run(main)
