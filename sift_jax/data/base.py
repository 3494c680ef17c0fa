"""The Dataset interface the trainer uses: stateless step-indexed batches, host shards, eval padding.

A training batch is a pure function of (config.seed, step): every random draw comes from a numpy
Generator seeded by (seed, purpose, step) and is made for the whole GLOBAL batch, of which each
process keeps its rows [p*B/P, (p+1)*B/P). Resuming at step N therefore needs nothing but N, and the
hosts of a multi-host run agree on the global batch without talking to each other.

Eval: the whole split in order, or with eval.max_examples = k a fixed sample of k examples spread
over the split, the same for every seed and host: class-stratified when the labels are at hand
(in-memory image splits), else a seeded uniform sample (TFDS splits); text takes k windows at
evenly spaced positions of the eval tokens. Never the first k (a split sorted by class would
yield one class).
"""

from __future__ import annotations

import abc
import queue
import threading
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from sift_jax.config_lib import ConfigError
from sift_jax.data import pipeline

Batch = dict[str, np.ndarray]

# Dataset name -> (config) -> the meta its Dataset would have, computed without loading the data.
METAS: dict[str, Callable[[ml_collections.ConfigDict], dict]] = {}

# Distinct seed streams, so the draws of different purposes never coincide.
STREAM_TEXT_WINDOWS = 0
STREAM_EPOCH_PERMUTATION = 1
STREAM_AUGMENT = 2
STREAM_EVAL_SUBSET = 3
# The eval subset does not depend on config.seed: runs of every seed score the same examples.
EVAL_SUBSET_SEED = 0


def rng(seed: int, stream: int, index: int) -> np.random.Generator:
  """The generator of draw `index` (a step or an epoch) of one purpose."""
  return np.random.default_rng([seed, stream, index])


class Dataset(abc.ABC):
  """Batches for one process of a (possibly multi-host) run.

  Subclasses set `kind`, `meta`, `num_train_examples`, `num_eval_examples` and implement
  `train_batch` and `_eval_rows` (eval examples by global index, without padding); one whose eval
  examples are not what `num_eval_examples` counts overrides `_eval_count`.
  """

  kind: str
  meta: dict
  num_train_examples: int
  num_eval_examples: int

  def __init__(
    self, config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
  ):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(
        f'process_index={process_index} with process_count={process_count}: need '
        '0 <= process_index < process_count'
      )
    if config.seed < 0:
      raise ValueError(f'seed={config.seed}: the data pipeline needs a seed >= 0')
    self.seed = int(config.seed)
    self.process_index = process_index
    self.process_count = process_count
    self.batch_size = self._checked_batch_size('batch_size', config.batch_size)
    self.eval_batch_size = self._checked_batch_size(
      'eval.batch_size', config.eval.batch_size or config.batch_size
    )
    if config.eval.max_examples < 0:
      raise ValueError(f'eval.max_examples={config.eval.max_examples}: need >= 0 (0 = all)')
    self.eval_max_examples = int(config.eval.max_examples)
    # Configs saved before the key existed build their batches in the thread.
    self.workers = pipeline.checked_workers(config.data.get('workers', 0))

  def _checked_batch_size(self, key: str, size: int) -> int:
    if size <= 0 or size % self.process_count:
      raise ValueError(
        f'{key}={size}: the global batch size must be positive and divisible by the process '
        f'count {self.process_count}'
      )
    return int(size)

  def _train_count(self) -> int:
    """How many distinct training examples there are to draw a batch from."""
    return self.num_train_examples

  def check_batch_sizes(self) -> None:
    """Refuses a global batch larger than its split, before any step is built: such a batch
    repeats examples within itself, and a very large one stalls the first step for minutes."""
    unit = 'windows' if self.kind == 'text' else 'examples'
    for key, size, split, count in (
      ('batch_size', self.batch_size, 'train', self._train_count()),
      ('eval.batch_size (0: batch_size)', self.eval_batch_size, 'eval', self._eval_count()),
    ):
      if size > count:
        raise ConfigError(
          f'{key}={size} is larger than the {split} split ({count} {unit}); allowed: at most '
          f'{count}'
        )

  def host_rows(self, global_size: int) -> slice:
    """This process's rows of a global batch of `global_size` rows."""
    per_host = global_size // self.process_count
    return slice(self.process_index * per_host, (self.process_index + 1) * per_host)

  @abc.abstractmethod
  def train_batch(self, step: int) -> Batch:
    """The host-local part of the global training batch of step `step` (0-based)."""

  @abc.abstractmethod
  def _eval_rows(self, indices: np.ndarray) -> Batch:
    """Eval examples at the given global indices, in order (indices < num_eval_examples)."""

  def _eval_count(self) -> int:
    """How many eval examples `_eval_rows` can index (before eval.max_examples)."""
    return self.num_eval_examples

  def _eval_subset(self, n: int, k: int) -> np.ndarray:
    """k of the n eval indices, sorted: a uniform sample without replacement."""
    return np.sort(rng(EVAL_SUBSET_SEED, STREAM_EVAL_SUBSET, 0).choice(n, k, replace=False))

  def eval_indices(self) -> np.ndarray:
    """The global indices of the examples an evaluation scores, in order."""
    n = self._eval_count()
    k = self.eval_max_examples
    return self._eval_subset(n, k) if 0 < k < n else np.arange(n)

  def train_iterator(self, start_step: int, prefetch: int = 3) -> Iterator[Batch]:
    """train_batch(start_step), train_batch(start_step + 1), ... built `prefetch` ahead in a thread.

    The image datasets build them in grain worker processes instead when `data.workers` > 0
    (pipeline.py); the batches are the same. Errors raised while building a batch are re-raised
    here. Closing the generator (or dropping it) stops the thread.
    """
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
      step = start_step
      while not stop.is_set():
        try:
          item = (self.train_batch(step), None)
        except Exception as e:  # handed to the consumer, which re-raises it
          item = (None, e)
        while not stop.is_set():
          try:
            out.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if item[1] is not None:
          return
        step += 1

    thread = threading.Thread(target=produce, daemon=True, name='sift_jax-data-prefetch')
    thread.start()
    try:
      while True:
        batch, error = out.get()
        if error is not None:
          raise error
        yield batch
    finally:
      stop.set()

  def eval_batches(self) -> Iterator[Batch]:
    """The examples of `eval_indices` in global batches of eval.batch_size; the last batch is
    padded with zero rows whose 'weights' are 0."""
    indices = self.eval_indices()
    n = len(indices)
    size = self.eval_batch_size
    rows = self.host_rows(size)
    for start in range(0, n, size):
      positions = np.arange(start + rows.start, start + rows.stop)
      valid = positions < n
      batch = self._eval_rows(indices[positions[valid]])
      pad = len(positions) - int(valid.sum())
      batch = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
      batch['weights'] = valid.astype(np.float32)
      yield batch


def stratified_sample(labels: np.ndarray, k: int, generator: np.random.Generator) -> np.ndarray:
  """k indices of `labels`, sorted, holding each class in proportion to the split (largest
  remainders get the spare places), drawn uniformly within each class."""
  classes, counts = np.unique(labels, return_counts=True)
  exact = k * counts / len(labels)
  quota = np.floor(exact).astype(np.int64)
  spare = np.argsort(-(exact - quota), kind='stable')[: k - int(quota.sum())]
  quota[spare] += 1
  picks = [
    generator.choice(np.flatnonzero(labels == c), q, replace=False)
    for c, q in zip(classes, quota, strict=True)
  ]
  return np.sort(np.concatenate(picks))
