"""A function's threefry hashes computed in as few calls as their dependencies allow.

XLA:CPU compiles each threefry2x32 as its own `while` loop. Initialising the tiny model draws 115
random parameters, each from its own key (`layers.ParamKeys`: `fold_in(key(seed), i)`): 392
threefry calls, and 95% of the init's 13-20 s compile was theirs (measured: the same program
with the draws replaced by zeros compiles in 0.6 s). threefry2x32 is elementwise in (key,
counter), so hashes that do not depend on each other can be computed by one call on their
inputs concatenated, bit for bit as before: here every key's `fold_in` is one call and every
parameter's draw another.

`batch_threefry(fn)` traces `fn`, expands its key operations into jax's own threefry
implementation (`jax.extend.random.threefry_prng_impl`, vectorised as jax's lowering does),
inlines the nested `jit` calls (`jax.random`'s), and evaluates the result with all threefry
calls at the same depth (the number of threefry calls on the longest path from the inputs to
them) as one. Inlining drops the nested calls' own shardings, not their values: the caller's
`out_shardings` place the results.

Only for a few parameters' worth of random bits on the CPU: the concatenated counters are one
unsharded array, which for a large model on an accelerator mesh would be replicated on every
device (`ShardedModel` uses it on the CPU only).
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend.random import threefry2x32_p
from jax.extend.random import threefry_prng_impl as THREEFRY


class Unsupported(Exception):
  """`fn` holds keys of another PRNG implementation than threefry2x32, or passes keys to an
  operation other than jax.random's (a `scan` over keys, say)."""


class _Ref(NamedTuple):
  """A value in the flattened graph: `index` of a computed value, or a constant `value`."""
  index: int | None = None
  value: Any = None


class _Node(NamedTuple):
  """One primitive application: `outs` indices computed from `ins` at `depth`."""
  primitive: jex_core.Primitive
  params: dict[str, Any]
  ins: list[_Ref]
  outs: list[int]
  depth: int  # threefry calls on the longest path from the inputs to this node


def _is_key(aval) -> bool:
  return jax.dtypes.issubdtype(getattr(aval, "dtype", None), jax.dtypes.prng_key)


def _key_data_aval(aval) -> jax.ShapeDtypeStruct:
  """Key arrays travel as their data: threefry keys `[*shape]` as uint32 `[*shape, 2]`."""
  if _is_key(aval):
    return jax.ShapeDtypeStruct((*aval.shape, 2), np.uint32)
  return jax.ShapeDtypeStruct(aval.shape, aval.dtype)


def _vmap(num_dims: int, f: Callable) -> Callable:
  for _ in range(num_dims):
    f = jax.vmap(f)
  return f


def _check_threefry(avals) -> None:
  for aval in avals:
    if _is_key(aval) and str(aval.dtype) != "key<fry>":
      raise Unsupported(f"keys of type {aval.dtype}")


class _Graph:
  """A closed jaxpr flattened into primitive applications with key operations expanded."""

  def __init__(self):
    self.nodes: list[_Node] = []
    self.depth: list[int] = []  # per value index

  def flatten(self, jaxpr: jex_core.Jaxpr, consts, ins: list[_Ref]) -> list[_Ref]:
    env = {}

    def read(var) -> _Ref:
      if isinstance(var, jex_core.Literal):
        return _Ref(value=np.asarray(var.val, var.aval.dtype))
      return env[var]

    for var, const in zip(jaxpr.constvars, consts):
      _check_threefry([var.aval])
      env[var] = _Ref(value=jax.random.key_data(const) if _is_key(var.aval) else const)
    env.update(zip(jaxpr.invars, ins))
    for eqn in jaxpr.eqns:
      env.update(zip(eqn.outvars, self._equation(eqn, [read(v) for v in eqn.invars])))
    return [read(v) for v in jaxpr.outvars]

  def _expand(self, f: Callable, ins: list[_Ref], avals) -> list[_Ref]:
    closed = jax.make_jaxpr(f)(*map(_key_data_aval, avals))
    return self.flatten(closed.jaxpr, closed.consts, ins)

  def _equation(self, eqn, ins: list[_Ref]) -> list[_Ref]:
    name, params = eqn.primitive.name, eqn.params
    avals = [v.aval for v in eqn.invars]
    _check_threefry(avals + [v.aval for v in eqn.outvars])
    if name == "jit":
      return self.flatten(params["jaxpr"].jaxpr, params["jaxpr"].consts, ins)
    if name == "random_seed":
      if params["impl"] is not THREEFRY:
        raise Unsupported(f"random_seed with {params['impl']}")
      return self._expand(_vmap(avals[0].ndim, THREEFRY.seed), ins, avals)
    if name == "random_fold_in" and avals[0].shape == avals[1].shape:
      return self._expand(_vmap(avals[0].ndim, THREEFRY.fold_in), ins, avals)
    if name == "random_bits":
      bits = lambda key: THREEFRY.random_bits(key, params["bit_width"], params["shape"])
      return self._expand(_vmap(avals[0].ndim, bits), ins, avals)
    if name == "random_split":
      split = lambda key: THREEFRY.split(key, params["shape"])
      return self._expand(_vmap(avals[0].ndim, split), ins, avals)
    if name in ("random_wrap", "random_unwrap"):
      return ins  # keys are their data here
    depth = max((self.depth[r.index] for r in ins if r.index is not None), default=0)
    outs = list(range(len(self.depth), len(self.depth) + len(eqn.outvars)))
    self.depth += [depth + (eqn.primitive is threefry2x32_p)] * len(outs)
    if any(_is_key(v.aval) for v in [*eqn.invars, *eqn.outvars]):
      raise Unsupported(f"keys passed to {name}")
    self.nodes.append(_Node(eqn.primitive, params, ins, outs, depth))
    return [_Ref(index=i) for i in outs]


def _evaluate(graph: _Graph, args: list[Any], outs: list[_Ref], inputs: list[_Ref]) -> list[Any]:
  """The graph's outputs, each depth's threefry calls made as one (traceable)."""
  values: list[Any] = [None] * len(graph.depth)
  for ref, arg in zip(inputs, args):
    values[ref.index] = arg
  read = lambda ref: ref.value if ref.index is None else values[ref.index]
  # A topological order: by depth, and within a depth the other nodes (in trace order) before
  # the threefry calls. A node's inputs come from threefry calls of smaller depth (made when
  # the first node of a greater depth comes) and from other nodes of no greater depth.
  is_threefry = lambda node: node.primitive is threefry2x32_p
  order = sorted(range(len(graph.nodes)),
                 key=lambda i: (graph.nodes[i].depth, is_threefry(graph.nodes[i]), i))
  pending: list[_Node] = []  # the threefry calls of the current depth
  for i in order:
    node = graph.nodes[i]
    if is_threefry(node):
      pending.append(node)
      continue
    if pending:
      _threefry_at_once(pending, values, read)
      pending = []
    out = node.primitive.bind(*map(read, node.ins), **node.primitive.get_bind_params(node.params))
    for index, value in zip(node.outs, out if node.primitive.multiple_results else [out]):
      values[index] = value
  if pending:
    _threefry_at_once(pending, values, read)
  return [read(ref) for ref in outs]


def _threefry_at_once(nodes: list[_Node], values: list[Any], read: Callable) -> None:
  """threefry2x32 of `nodes` (each `(key1, key2, count1, count2) -> (bits1, bits2)`, its four
  uint32 inputs broadcast to one shape) as one call on their flattened inputs."""
  shapes = [jnp.broadcast_shapes(*(jnp.shape(read(r)) for r in node.ins)) for node in nodes]
  flat = [jnp.concatenate([jnp.broadcast_to(read(node.ins[k]), shape).ravel()
                           for node, shape in zip(nodes, shapes)]) for k in range(4)]
  bits = threefry2x32_p.bind(*flat)
  start = 0
  for node, shape in zip(nodes, shapes):
    size = math.prod(shape)
    for index, out in zip(node.outs, bits):
      values[index] = out[start:start + size].reshape(shape)
    start += size


def batch_threefry(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn`, bit for bit, with its threefry calls of equal depth made as one (module docstring).

  Traceable (call it under `jax.jit`). Where `fn` holds keys of another implementation or
  passes keys to other operations (`Unsupported`), `fn` itself runs.
  """

  def batched(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    graph = _Graph()
    inputs = [_Ref(index=i) for i in range(len(closed.jaxpr.invars))]
    graph.depth = [0] * len(inputs)
    try:
      if any(_is_key(v.aval) for v in [*closed.jaxpr.invars, *closed.jaxpr.outvars]):
        raise Unsupported("keys among the inputs or outputs")
      outs = graph.flatten(closed.jaxpr, closed.consts, inputs)
    except Unsupported:
      return fn(*args)
    leaves = _evaluate(graph, jax.tree_util.tree_leaves(args), outs, inputs)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), leaves)

  return batched
