"""Device mesh, shardings and global batches (jax.sharding; works across hosts).

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (the batch is split over it
too, and so is the train state). A state leaf is sharded along `fsdp` by its shape alone, so a
mask, its param, the param's optimizer moments and the rule's per-weight state always get the
same sharding: there is one rule, `leaf_spec`, and nothing else decides.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ('data', 'fsdp')  # the batch is split over every device
FSDP = 'fsdp'


def make_mesh(c: ml_collections.ConfigDict) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices from `mesh.data` x `mesh.fsdp`.

  Devices are ordered process by process (jax.devices() order), so an fsdp group never spans
  hosts when mesh.fsdp divides the local device count: parameter all-gathers stay on the
  fast intra-host links and only gradients cross hosts.
  """
  n = jax.device_count()
  fsdp = c.mesh.fsdp
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} must be a positive divisor of the device count {n}')
  data = n // fsdp if c.mesh.data == -1 else c.mesh.data
  if data * fsdp != n:
    raise ValueError(
      f'mesh.data={c.mesh.data} x mesh.fsdp={fsdp} must equal the device count {n} '
      '(mesh.data=-1 takes every device fsdp leaves)'
    )
  if c.mesh.fsdp_min_size < 0:
    raise ValueError(f'mesh.fsdp_min_size={c.mesh.fsdp_min_size} must be >= 0')
  devices = np.asarray(jax.devices()).reshape(data, fsdp)
  return Mesh(devices, BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch_size') -> None:
  if batch_size <= 0 or batch_size % mesh.size:
    raise ValueError(
      f'{what}={batch_size} must be a positive multiple of the device count {mesh.size}'
    )
  if batch_size % jax.process_count():
    raise ValueError(
      f'{what}={batch_size} must be divisible by the process count {jax.process_count()}'
    )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each host's rows into global arrays sharded along the batch dimension."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
  """The PartitionSpec of one state leaf: its first axis divisible by `fsdp`, along 'fsdp'.

  Leaves smaller than `min_size` elements (biases, norms, scalars) stay replicated: sharding
  them saves no memory and costs a collective each. The first divisible axis is taken (not the
  largest) because a row-major flatten of an array sharded on its leading axis stays sharded,
  which keeps the mask updates' per-layer reductions local (sparsity/select.py flattens).
  """
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
    return PartitionSpec()
  for axis, size in enumerate(shape):
    if size % fsdp == 0:
      return PartitionSpec(*([None] * axis), FSDP)
  return PartitionSpec()


def state_shardings(mesh: Mesh, abstract_state: Any, min_size: int = 0) -> Any:
  """NamedShardings for every leaf of the train state (ShapeDtypeStructs or arrays)."""
  fsdp = mesh.shape[FSDP]
  return jax.tree.map(
    lambda a: NamedSharding(mesh, leaf_spec(tuple(a.shape), fsdp, min_size)), abstract_state
  )


def fetch(tree: Any) -> Any:
  """Host numpy copies of a tree of arrays, gathering shards that live on other processes."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
