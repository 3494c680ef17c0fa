"""The grain input pipeline (data.workers > 0): the thread path's batches for every worker count and
start step, each host reading only its rows, and bad data.workers values."""

import itertools

import numpy as np
import pytest

from sift_jax import config_lib, errors
from sift_jax.data import build_dataset, pipeline
from sift_jax.data import images as images_lib

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
IMAGENET_LIKE = images_lib.ImageSpec(10, (224, 224, 3), MEAN, STD, 'imagenet')
CIFAR_LIKE = images_lib.ImageSpec(10, (32, 32, 3), MEAN, STD, 'crop_flip')


def make_config(workers: int = 0, batch_size: int = 6):
  c = config_lib.base_config()
  c.batch_size = batch_size
  c.data.workers = workers
  return c


def array_source(n: int, shape: tuple[int, int, int]) -> images_lib.ArraySource:
  generator = np.random.default_rng(0)
  pixels = generator.integers(0, 256, (n, *shape), dtype=np.uint8)
  return images_lib.ArraySource(pixels, np.arange(n) % 10)


class GuardedSource(images_lib.ArraySource):
  """An ArraySource that refuses to read any example outside `allowed`."""

  def __init__(self, source: images_lib.ArraySource, allowed: set[int]):
    super().__init__(source.images, source.labels)
    self.allowed = allowed

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outside = sorted(set(indices.tolist()) - self.allowed)
    if outside:
      raise LookupError(f'read examples {outside} outside this host rows')
    return super().get(indices)


def take(dataset, start: int, n: int) -> list[dict]:
  batches = dataset.train_iterator(start)
  try:
    return list(itertools.islice(batches, n))
  finally:
    batches.close()


def assert_batches_equal(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for a, b in zip(got, want, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_grain_batches_are_the_thread_batches_for_any_worker_count_and_start():
  """Random-resized crops of 20 examples in batches of 6: step 3 straddles two epochs."""
  source = array_source(20, (36, 44, 3))
  reference = images_lib.ImageDataset(make_config(), source, source, IMAGENET_LIKE)
  want = [reference.train_batch(step) for step in range(5)]
  assert not np.array_equal(want[0]['image'], want[1]['image'])
  for workers in (0, 2):  # one worker: the registered-dataset test below
    d = images_lib.ImageDataset(make_config(workers), source, source, IMAGENET_LIKE)
    assert_batches_equal(take(d, 0, 5), want)
    assert_batches_equal(take(d, 3, 2), want[3:])  # resumed at step 3 from the step alone


def test_a_registered_dataset_takes_data_workers_from_the_config():
  c = make_config(workers=1, batch_size=16)
  d = build_dataset(c)  # digits
  assert d.workers == 1
  assert d.train_iterator(0).__name__ == 'grain_train_iterator'  # not started: no worker yet
  assert_batches_equal(take(d, 7, 2), [d.train_batch(7), d.train_batch(8)])


@pytest.mark.slow  # host-local rows: test_data.py's host shards (thread) by default
def test_each_host_reads_and_gets_only_its_rows_of_the_global_batch():
  """2 emulated hosts, batch 8 of 200 examples: steps 0-19 stay inside epoch 0, so each host's
  rows of those steps are its own examples; a read of any other one fails in the worker."""
  source = array_source(200, (32, 32, 3))
  steps, timed = 20, 3

  def host(p: int, src=source, workers: int = 0):
    c = make_config(workers, batch_size=8)
    return images_lib.ImageDataset(c, src, src, CIFAR_LIKE, process_index=p, process_count=2)

  whole = images_lib.ImageDataset(make_config(batch_size=8), source, source, CIFAR_LIKE)
  rows = [[host(p).train_indices(s) for s in range(steps)] for p in (0, 1)]
  for s in range(steps):
    assert not set(rows[0][s]) & set(rows[1][s])
    np.testing.assert_array_equal(np.concatenate([rows[0][s], rows[1][s]]), whole.train_indices(s))
  halves = []
  for p in (0, 1):
    guarded = GuardedSource(source, set(np.concatenate(rows[p]).tolist()))
    halves.append(take(host(p, guarded, workers=2), 0, timed))
  for s in range(timed):
    glued = {k: np.concatenate([halves[0][s][k], halves[1][s][k]]) for k in halves[0][s]}
    assert_batches_equal([glued], [whole.train_batch(s)])

  missing = set(np.concatenate(rows[0]).tolist()) - {int(rows[0][1][2])}
  batches = host(0, GuardedSource(source, missing), workers=1).train_iterator(0)
  next(batches)
  with pytest.raises(LookupError, match=f'read examples \\[{rows[0][1][2]}\\] outside'):
    next(batches)
  batches.close()


@pytest.mark.parametrize('value', [-1, True, 1.5, '2'])
def test_bad_data_workers_is_a_user_error_naming_the_value(value):
  with pytest.raises(pipeline.WorkersError, match=f'data.workers={value!r}: need an integer >= 0'):
    pipeline.checked_workers(value)


def test_build_dataset_refuses_negative_workers():
  c = make_config(workers=-2)
  with pytest.raises(errors.UserError, match=r'data\.workers=-2: need an integer >= 0 \(0 = '):
    build_dataset(c)
