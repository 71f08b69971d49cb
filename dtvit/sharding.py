"""Data-parallel sharding: a 1-D device mesh, replicated state, batches split over the 'data' axis.

Works the same on one CPU, 8 fake CPU devices, a GPU node or a multi-host TPU/GPU slice (after
`jax.distributed.initialize`, every process feeds its local slice of the global batch).
"""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = -1) -> jax.sharding.Mesh:
  """A ('data',) mesh over `num_devices` devices (-1: all devices of all processes)."""
  total = jax.device_count()
  n = total if num_devices in (-1, 0, None) else num_devices
  if n > total or n < 1:
    raise ValueError(f"mesh.num_devices={num_devices} but {total} devices are visible.")
  if jax.process_count() > 1 and n != total:
    raise ValueError("With several processes the mesh must span all devices (mesh.num_devices=-1).")
  devices = jax.devices()[:n]
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh, what: str = "batch_size") -> None:
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(f"{what}={global_batch_size} is not divisible by the {n} devices of the mesh; "
                     f"use a multiple of {n} (or set mesh.num_devices).")


def global_batch(mesh, local_batch: dict) -> dict:
  """Turns this process's slice of the batch (numpy) into global arrays sharded over 'data'."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def replicate(mesh, tree):
  return jax.device_put(tree, replicated(mesh))


def state_shardings(mesh, abstract_state):
  """The sharding of every leaf of a train state (a pytree of arrays or `jax.ShapeDtypeStruct`s): replicated
  (data parallel). The one place to change for sharded params."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def any_process(flag: bool) -> bool:
  """Whether `flag` is True in any process. A collective: every process must call it at the same point (e.g.
  after the same train step), and then all get the same answer."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))
