"""Device mesh, shardings and global batches (jax.sharding; works across hosts)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ('data', 'fsdp')  # the batch is split over every device


def make_mesh(c: ml_collections.ConfigDict) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices from `mesh.data` x `mesh.fsdp`."""
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


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
  """Shardings for every leaf of the train state: replicated (data parallel)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)
