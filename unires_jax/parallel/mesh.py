"""The device mesh (`data`, `fsdp`, `tensor`) and how batches are placed on it.

Batches are split over `data` x `fsdp` (FSDP is data parallelism whose parameters are sharded
too), replicated over `tensor`. Each process feeds the rows of the global batch held by its own
devices, so the same code runs on one host and on a pod (`jax.distributed.initialize()` first).
"""

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (`data`, `fsdp`, `tensor`) from `config.mesh`, resolving one -1 to the rest."""
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
  sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(mesh_cfg)}: sizes must be positive, one may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"config.mesh={dict(mesh_cfg)} does not divide {num_devices} devices")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh={dict(mesh_cfg)} needs {math.prod(sizes)} devices, "
                     f"there are {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all of them, every process's) with axes `MESH_AXES`.

  `jax.make_mesh` orders the devices so that the inner axes (`tensor`, then `fsdp`) fall on
  the fastest links (within a host / ICI ring).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: jit's in/out shardings fix the layout at the boundary, XLA's sharding
  # propagation the rest (pjit style).
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()) or devices[0].platform == "tpu":  # incl. abstract TPU chips
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of every batch array: rows over `data` x `fsdp`, other dimensions replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_rows(mesh: Mesh) -> int:
  """How many ways the batch dimension is split: `data * fsdp`."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of the global batch -> global arrays sharded by `batch_sharding`.

  Every process passes its own `global_batch / process_count` rows (what
  `unires_jax.data.pipeline` yields), in process order.
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar; batch fields need a leading batch axis")
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh), value)
  return out
