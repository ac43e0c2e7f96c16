"""The one table from the models' logical axis names to mesh axes, and its application.

Model code names the dimensions of every parameter (`unires_jax.models.layers` lists the
names); only this table knows the mesh. `fsdp` shards the residual width (`embed`),
`tensor` the hidden / head / vocabulary dimensions (Megatron style). Changing the parallelism
changes this table, never a model.

Convolution channels (`conv_in`, `conv_out`: the ConvNeXt stem, downsampling and depthwise
convolutions, the pixel decoder) stay replicated. With them sharded, XLA's SPMD partitioner
(jaxlib 0.10.2, CPU) computes wrong gradients for the conv towers when the batch is split over
both `data` and `fsdp` (mesh 2x2x2: the stem kernel's gradient off by 40%, while 8x1x1, 1x8x1,
1x1x8 and 1x2x4 are right); `tests/train/test_sharded_step.py` catches it. These are ~1% of the
parameters; ConvNeXt's pointwise MLPs, where its weight is, are sharded as `embed` / `mlp`.

A dimension whose size the mesh axis does not divide stays replicated (e.g. a vocabulary of
138 rows on tensor=4): `logical_to_mesh` says so in its result, and the tests check
every array against it.
"""

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unires_jax import utils

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # activations
    ("embed", "fsdp"),
    ("features", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", None),  # see the module docstring
    ("conv_out", None),
    ("position", None),
    ("conv_window", None),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis of scanned layers (config.model.scan_layers)
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
    components = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    for component in components:
      if component in used:
        raise ValueError(f"{where}: logical axes {used[component]!r} and {name!r} both map to "
                         f"mesh axis {component!r}")
      used[component] = name
    ways = math.prod(mesh.shape[c] for c in components)
    spec.append(axis if components and size % ways == 0 else None)
  return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, *, where: str = "variable",
                      rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES
                      ) -> NamedSharding:
  """The sharding of one variable from its logical axis names; replicated without names."""
  names = variable.get_metadata().get("out_sharding")
  if names is None:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, logical_to_mesh(names, variable.get_value().shape, mesh, rules,
                                             where=where))


def state_shardings(tree: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> Any:
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
      return leaf.replace(variable_sharding(leaf, mesh, where=utils.path_str(path), rules=rules))
    return replicated

  return jax.tree_util.tree_map_with_path(
      one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
