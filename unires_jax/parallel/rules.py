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
    if isinstance(leaf, nnx.Variable) and not hasattr(leaf.get_value(), "shape"):
      return leaf  # e.g. optax's MaskedNode: a placeholder without arrays
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(variable_sharding(leaf, mesh, where=path_str(path), rules=rules))
    return replicated

  return jax.tree_util.tree_map_with_path(
      one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_local(fn, x: jax.Array, *replicated: Any) -> jax.Array:
  """`fn(x, *replicated)` computed per device on its own rows of `x` `[batch, ...]`, the
  `replicated` arguments (e.g. a module's parameters) whole on every device; unchanged outside a
  mesh. Differentiating it sums the replicated arguments' gradients over the batch shards
  (`jax.shard_map`'s transpose), a path that does not rely on the partitioner.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(x, *replicated)
  rows = logical_to_mesh(("batch",), x.shape[:1], mesh, where="batch_local")
  specs = (PartitionSpec(*rows),) + (PartitionSpec(),) * len(replicated)
  return jax.shard_map(lambda x, *r: fn(x, *r), mesh=mesh, in_specs=specs,
                       out_specs=PartitionSpec(*rows))(x, *replicated)
