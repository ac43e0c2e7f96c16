"""Device mesh, the logical-to-mesh sharding rules, and sharded placement of arrays."""

from unires_jax.parallel.mesh import MESH_AXES
from unires_jax.parallel.mesh import batch_sharding
from unires_jax.parallel.mesh import make_mesh
from unires_jax.parallel.mesh import shard_batch
from unires_jax.parallel.rules import LOGICAL_AXIS_RULES
from unires_jax.parallel.rules import batch_local
from unires_jax.parallel.rules import logical_to_mesh
from unires_jax.parallel.rules import path_str
from unires_jax.parallel.rules import state_shardings
from unires_jax.parallel.rules import variable_sharding

__all__ = [
    "LOGICAL_AXIS_RULES", "MESH_AXES", "batch_local", "batch_sharding", "logical_to_mesh", "make_mesh",
    "path_str", "shard_batch", "state_shardings", "variable_sharding",
]
