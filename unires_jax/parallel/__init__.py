"""Device mesh, the logical-to-mesh sharding rules, sharded placement of arrays, and the model
on a mesh (sharded parameters, the jitted forward)."""

from unires_jax.parallel.mesh import MESH_AXES
from unires_jax.parallel.mesh import batch_sharding
from unires_jax.parallel.mesh import make_mesh
from unires_jax.parallel.mesh import shard_batch
from unires_jax.sharding import logical_to_mesh
from unires_jax.parallel.rules import from_config as rules_from_config
from unires_jax.parallel.rules import state_shardings
from unires_jax.parallel.rules import variable_sharding
from unires_jax.parallel.sharded_model import ShardedModel
from unires_jax.parallel.sharded_model import make_predict
from unires_jax.parallel.sharded_model import on_mesh

__all__ = [
    "MESH_AXES", "ShardedModel", "batch_sharding", "logical_to_mesh", "make_mesh",
    "make_predict", "on_mesh", "rules_from_config", "shard_batch", "state_shardings",
    "variable_sharding",
]
