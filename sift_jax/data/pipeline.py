"""Training batches built in grain worker processes (`data.workers` > 0): the image pipeline at scale.

With `data.workers` = 0 (the default) a dataset's `train_iterator` builds its batches in one
prefetch thread of the training process (base.Dataset.train_iterator). Decoding and augmenting
ImageNet-sized JPEGs with numpy/PIL in one thread cannot feed an accelerator host, and threads do
not help (the GIL), so with `data.workers` = N the image datasets hand the same work to N grain
worker processes:

  grain.MapDataset.range(start_step, ...)   # the step numbers
    .map(dataset.train_batch)               # one host-local batch per step, as in the thread
    .to_iter_dataset(ReadOptions(num_threads=0))
    .mp_prefetch(MultiprocessingOptions(num_workers=N))

An element is a whole batch, not an example, on purpose: grain slices the MapDataset among the
workers (worker w takes elements w, w+N, ...) and interleaves their outputs in order, so only when
the batch is built inside one element is its content independent of N. The batch of step t is
therefore `train_batch(t)`, bit for bit the thread path's batch, for every worker count and
whatever the start step: the determinism and host-sharding contract of base.py holds unchanged
(a batch is a pure function of (seed, step); each host reads and augments only its own rows of the
global batch, with draws made from (seed, step) for the whole global batch). Resuming at step N
starts the range at N.

A worker is a spawned process that receives the dataset by pickling, so the train source must be
picklable: in-memory arrays are copied to each worker; TFDS's ArrayRecord data sources pickle as a
few kB that reopen the files. Each worker copies its finished batches into shared memory (for
ImageNet float32 batches a noticeable fraction of the work: one worker can be slower than the
thread) and queues up to ceil(prefetch / N) of them, and grain buffers as many per worker in this
process: about 2 * prefetch + N batches in memory, against prefetch + 1 for the thread.

Text datasets keep the thread path for any `data.workers`: their batches are slices of a token
array in memory, which one thread builds far faster than a step consumes them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

from sift_jax.errors import UserError

Batch = TypeVar('Batch')  # base.Batch; base.py imports this module, so not imported from there


class WorkersError(UserError, ValueError):
  """A `data.workers` value the input pipeline cannot run with."""


def checked_workers(workers: object) -> int:
  """`data.workers` as an int, or WorkersError naming the value and what is allowed."""
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
    raise WorkersError(
      f'data.workers={workers!r}: need an integer >= 0 (0 = build the training batches in a '
      'thread of the training process, N > 0 = in N grain worker processes)'
    )
  return workers


def grain_train_iterator(
  train_batch: Callable[[int], Batch], start_step: int, workers: int, prefetch: int
) -> Iterator[Batch]:
  """train_batch(start_step), train_batch(start_step + 1), ... built in `workers` processes.

  `train_batch` must be picklable (a bound method of a picklable dataset). Errors raised while
  building a batch are re-raised here with the worker's traceback. Closing the generator (or
  dropping it) stops the workers.
  """
  # Imported here: grain (and its multiprocessing machinery) loads only when a run asks for it.
  import grain

  _default_unparsed_grain_flag()
  steps = grain.MapDataset.range(start_step, sys.maxsize).map(train_batch)
  # num_threads=0: each worker builds its batches in its main thread; the parallelism is the
  # processes, and more threads would only add batches in memory and GIL contention.
  ds = steps.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
    grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=max(1, math.ceil(prefetch / workers))
    )
  )
  it = iter(ds)
  try:
    yield from it
  finally:
    it.close()


# Read by grain 0.2.18 when it starts a worker whenever JAX is installed; google/grain#1355.
PROFILING_FLAG = 'grain_enable_multiprocess_worker_profiling'


def _default_unparsed_grain_flag() -> None:
  """Gives grain's worker-profiling flag its default in a process that never parsed absl flags.

  grain 0.2.18 reads the flag's value when it starts workers, which raises
  UnparsedFlagAccessError in such a process (tests, notebooks: train_and_evaluate without
  absl.app); fixed upstream after that release. Parsing just this flag as its default keeps the
  behaviour and leaves every other flag, and a later parse of the command line, alone.
  """
  from absl import flags

  if flags.FLAGS.is_parsed() or PROFILING_FLAG not in flags.FLAGS:
    return
  flag = flags.FLAGS[PROFILING_FLAG]
  if not flag.present:
    flag.parse(flag.default)
