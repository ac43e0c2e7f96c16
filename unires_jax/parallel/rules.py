"""The one table from the models' logical axis names to mesh axes, and its application.

Model code names the dimensions of every parameter (`unires_jax.models.layers` lists the
names); only this table knows the mesh. `fsdp` shards the residual width (`embed`) and the
input channels of convolutions, `tensor` the hidden / head / vocabulary dimensions (Megatron
style). Changing the parallelism changes this table, never a model.

A dimension whose size the mesh axis does not divide stays replicated (e.g. the 3 input
channels of a patch embedding): `logical_to_mesh` says so in its result, and the tests check
every array against it.
"""

from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("features", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    ("position", None),
    ("conv_window", None),
    ("norm", None),
)


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
                    *, where: str = "array") -> PartitionSpec:
  """The `PartitionSpec` of an array of `shape` whose dimensions are named `names`.

  Raises a ValueError naming `where` for an unknown logical name, or when two dimensions map
  to the same mesh axis (the table and the model's names disagree).
  """
  table = dict(rules)
  if len(names) != len(shape):
    raise ValueError(f"{where}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
  spec, used = [], {}
  for name, size in zip(names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"{where}: logical axis {name!r} has no rule; rules: {sorted(table)}")
    axis = table[name]
    if axis is not None and axis in used:
      raise ValueError(f"{where}: logical axes {used[axis]!r} and {name!r} both map to mesh "
                       f"axis {axis!r}")
    if axis is not None:
      used[axis] = name
    spec.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
  return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, *, where: str = "variable",
                      rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES
                      ) -> NamedSharding:
  """The sharding of one variable from its logical axis names; replicated without names."""
  names = variable.get_metadata().get("out_sharding")
  if names is None:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, logical_to_mesh(names, variable.value.shape, mesh, rules,
                                             where=where))


def path_str(path) -> str:
  """A pytree key path as "llm/model/layers/0/mlp/up_proj/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def state_shardings(tree: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> Any:
  """`NamedSharding`s for a pytree holding `nnx.Variable`s (an `nnx.State`, a train state with
  optimizer moments), abstract or concrete, with the same structure.

  Variables are sharded by their logical axis names; every other leaf (step counters, scalars)
  and variables without names are replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(variable_sharding(leaf, mesh, where=path_str(path), rules=rules))
    return replicated

  return jax.tree_util.tree_map_with_path(
      one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
