"""Logical axis names to mesh axes: the one mapping that parameters, activation constraints and
per-device kernels share. The rules and the mesh come from where a function is traced
(`jax.set_mesh` and `nnx.logical_axis_rules`, both set by `unires_jax.parallel.on_mesh`); the
table itself is `config.logical_axis_rules` (`unires_jax.parallel.rules`). Model and kernel code
names logical axes only; nothing here imports the rest of the package.
"""

import math
from typing import Any, Sequence

import flax.core.spmd
import jax
from jax.sharding import PartitionSpec


Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Any, rules: Rules,
                    *, where: str = "array") -> PartitionSpec:
  """The `PartitionSpec` of an array of `shape` whose dimensions are named `names`, on `mesh`
  (a `Mesh` or an abstract one: only its axis sizes are read). A dimension whose size the mesh
  axes do not divide stays replicated.

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


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """`x` laid out as its logical axis `names` (one per dimension) map under the rules and mesh
  it is traced under (`unires_jax.parallel.on_mesh` sets both); `x` itself outside a mesh.

  XLA propagates shardings from the parameters and the batch; constraints at the residual
  streams fix what it would otherwise choose between (MaxText's activation sharding).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_mesh(names, x.shape, mesh, flax.core.spmd.get_logical_axis_rules(),
                         where="activation")
  return jax.lax.with_sharding_constraint(x, spec)


def mesh_axes(name: str) -> tuple[str, ...]:
  """The mesh axes the logical axis `name` maps to under the rules and mesh it is traced under
  (`unires_jax.parallel.on_mesh` sets both); () outside a mesh.

  Raises a ValueError when a mesh is set but no rule names `name`.
  """
  if jax.sharding.get_abstract_mesh().empty:
    return ()
  rules = dict(flax.core.spmd.get_logical_axis_rules())
  if name not in rules:
    raise ValueError(f"traced under a mesh but no logical axis rule maps {name!r} to mesh "
                     "axes: trace it under unires_jax.parallel.on_mesh (or nnx.logical_axis_rules)")
  axes = rules[name]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def dividing_mesh_axes(name: str, *sizes: int) -> tuple[str, ...]:
  """`mesh_axes(name)` when their total size divides every one of `sizes`, else () (the
  dimension stays whole on every device)."""
  axes = mesh_axes(name)
  ways = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
  return axes if all(size % ways == 0 for size in sizes) else ()
