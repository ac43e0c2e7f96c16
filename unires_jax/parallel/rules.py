"""The logical-to-mesh rules (`config.logical_axis_rules`) and their application.

Model code names the dimensions of every parameter and of the residual streams
(`unires_jax.models.layers` lists the names); only the config's table knows the mesh. Changing
the parallelism changes that table, never a model.

Convolution channels (`conv_in`, `conv_out`: the ConvNeXt stem, downsampling and depthwise
convolutions, the pixel decoder) stay replicated in the default table. With them sharded, XLA's
SPMD partitioner (jaxlib 0.10.2, CPU) computes wrong gradients for the conv towers when the batch
is split over both `data` and `fsdp` (mesh 2x2x2: the stem kernel's gradient off by 40%, while
8x1x1, 1x8x1, 1x1x8 and 1x2x4 are right); `tests/train/test_sharded_step.py` catches it. These
are ~1% of the parameters; ConvNeXt's pointwise MLPs, where its weight is, are sharded as
`embed` / `mlp`.

A dimension whose size the mesh axis does not divide stays replicated (e.g. a vocabulary of
138 rows on tensor=4): `sharding.logical_to_mesh` says so in its result, and the tests check
every array against it.
"""

from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unires_jax import sharding, utils
from unires_jax.parallel import mesh as mesh_lib

def from_config(config: ml_collections.ConfigDict) -> sharding.Rules:
  """The rules of `config.logical_axis_rules` (logical name -> comma-separated mesh axes, ""
  for replicated), as `(name, None | axis | (axes...))` pairs; an unknown mesh axis is named with
  its field."""
  out = []
  for name, value in config.logical_axis_rules.items():
    where = f"config.logical_axis_rules.{name}"
    if not isinstance(value, str):
      raise ValueError(f"{where}={value!r}: give mesh axes as a comma-separated string, "
                       f"'' for replicated")
    components = tuple(a.strip() for a in value.split(",") if a.strip())
    unknown = [a for a in components if a not in mesh_lib.MESH_AXES]
    if unknown:
      raise ValueError(f"{where}={value!r}: unknown mesh axis {unknown[0]!r}; mesh axes are "
                       f"{mesh_lib.MESH_AXES}")
    out.append((name, None if not components else
                components[0] if len(components) == 1 else components))
  return tuple(out)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: sharding.Rules, *,
                      where: str = "variable") -> NamedSharding:
  """The sharding of one variable from its logical axis names; replicated without names."""
  names = variable.get_metadata().get("out_sharding")
  if names is None:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, sharding.logical_to_mesh(names, variable.get_value().shape, mesh,
                                                    rules, where=where))


def state_shardings(tree: Any, mesh: Mesh, rules: sharding.Rules) -> Any:
  """`NamedSharding`s for a pytree holding `nnx.Variable`s (an `nnx.State`, a train state with
  optimizer moments), abstract or concrete, with the same structure.

  Variables are sharded by their logical axis names; every other leaf (step counters, scalars)
  and variables without names are replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    if isinstance(leaf, nnx.Variable) and not hasattr(leaf.get_value(), "shape"):
      return leaf  # e.g. optax's MaskedNode: a placeholder without arrays
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(variable_sharding(leaf, mesh, rules, where=utils.path_str(path)))
    return replicated

  return jax.tree_util.tree_map_with_path(
      one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
