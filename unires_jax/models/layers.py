"""Parameters with logical axis names, and the small layers every tower shares.

Every parameter carries one logical name per dimension in its `out_sharding` metadata. The
mesh rules of `unires_jax.parallel` map these names to mesh axes; model code never names a mesh
axis. Variables are created unsharded (`eager_sharding=False`): sharded creation happens by
jitting the init with the out shardings that the rules give.

Logical axis names used by the models:
  embed        width of a tower's residual stream (CLIP width, LLM hidden size, decoder width)
  mlp          hidden width of a feed-forward block
  heads        query heads (a fused `heads * head_dim` dimension is named `heads` too)
  kv_heads     key/value heads (fused with head_dim, as above)
  vocab        vocabulary
  position     rows of a learned position-embedding table
  conv_window  spatial dimensions of a convolution kernel
  conv_in      input channels of a convolution kernel
  conv_out     output channels of a convolution kernel; also the channels of a conv tower's
               norms, biases and layer scales
  norm         the feature dimension of a norm whose width is not a tower width
  features     input features that come from another tower (projector inputs)
  layers       the leading axis of a stacked layer (`config.model.scan_layers`): one entry per
               transformer layer, never sharded
  lora_rank    the rank dimension of a low-rank adapter (`unires_jax.models.lora`), never sharded
A dimension that is never sharded (e.g. a size-1 output) is named None.

Activations get names too, where a tower's residual stream passes (`unires_jax.sharding.constrain`):
  activation_batch   the batch dimension (also how `batch_local` splits rows)
  activation_length  tokens of a sequence, pixels of a feature map
  activation_embed   the residual width

`config.logical_axis_rules` maps every name to mesh axes (`unires_jax.parallel.rules`).
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from unires_jax.sharding import dividing_mesh_axes

Initializer = Callable[..., jax.Array]

DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
ZEROS = nnx.initializers.zeros_init()
ONES = nnx.initializers.ones_init()


def axes(*names: str | None) -> dict[str, Any]:
  """Metadata giving a variable logical axis names (one per dimension), created unsharded."""
  return {"out_sharding": tuple(names), "eager_sharding": False}


class ParamKeys:
  """The parameter keys of `nnx.Rngs(params=seed)` (key i is `fold_in(key(seed), i)`), counted
  in Python: pass it where a module takes `rngs` to build a model, abstractly too.

  `nnx.Rngs` keeps its count in a Variable; under `nnx.eval_shape` each key bumps a traced count,
  and flax 0.12.8 then reads the tracer's `sharding`, whose error message JAX builds by walking
  the whole trace so far: quadratic in the number of parameters. Same keys, no trace.
  """

  def __init__(self, seed: int):
    self._key, self._count = jax.random.key(seed), 0

  def params(self) -> jax.Array:
    key = jax.random.fold_in(self._key, self._count)
    self._count += 1
    return key


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype: Any = jnp.float32,
) -> nnx.Param:
  """A parameter of `shape` with one logical axis name per dimension."""
  if len(shape) != len(names):
    raise ValueError(f"param of shape {tuple(shape)} needs {len(shape)} axis names, got {names}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), **axes(*names))


def linear(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    kernel_init: Initializer = DEFAULT_KERNEL_INIT,
) -> nnx.Linear:
  """`nnx.Linear` with kernel `[in_features, out_features]` named `names`, bias `[names[1]]`."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=kernel_init,
      kernel_metadata=axes(*names),
      bias_metadata=axes(names[1]),
      rngs=rngs,
  )


def layer_norm(
    features: int,
    name: str,
    *,
    rngs: nnx.Rngs,
    epsilon: float,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.LayerNorm:
  """`nnx.LayerNorm` over the last axis, scale and bias named `[name]`.

  Variance is computed as E[(x - mean)^2] (as PyTorch does), not E[x^2] - mean^2.
  """
  return nnx.LayerNorm(
      features,
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=param_dtype,
      use_fast_variance=False,
      scale_metadata=axes(name),
      bias_metadata=axes(name),
      rngs=rngs,
  )


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    rngs: nnx.Rngs,
    strides: int = 1,
    padding: Any = "SAME",
    feature_group_count: int = 1,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.Conv:
  """2-D `nnx.Conv` on `[batch, height, width, channels]`; kernel `[kh, kw, in/groups, out]`.

  Kernel axes are (`conv_window`, `conv_window`, `conv_in`, `conv_out`), bias (`conv_out`,).
  """
  return nnx.Conv(
      in_features,
      out_features,
      (kernel_size, kernel_size),
      strides=strides,
      padding=padding,
      feature_group_count=feature_group_count,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=axes("conv_window", "conv_window", "conv_in", "conv_out"),
      bias_metadata=axes("conv_out"),
      rngs=rngs,
  )


class AttentionProjections(nnx.Module):
  """The q/k/v/out projections of multi-head attention over one width, each `[dim, dim]` + bias.

  The base of the attention modules whose PyTorch originals hold four such Linear layers (CLIP's
  attention; `nn.MultiheadAttention` with its in-projection split): parameters are
  `q_proj`, `k_proj`, `v_proj` and `out_proj` (each `kernel`, `bias`) under the module, the names
  the converters map. Kernels are named (`embed`, `heads`), the output one (`heads`, `embed`).
  Subclasses add the attention itself.
  """

  def __init__(self, dim: int, num_heads: int, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide the attention width {dim}")
    self.num_heads = num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(dim, dim, ("embed", "heads"), **kw)
    self.k_proj = linear(dim, dim, ("embed", "heads"), **kw)
    self.v_proj = linear(dim, dim, ("embed", "heads"), **kw)
    self.out_proj = linear(dim, dim, ("heads", "embed"), **kw)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
  """erf-based GELU, as `torch.nn.GELU()` computes it."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": gelu_exact,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Looks up an activation by its config name, with a clear error for unknown names."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn: Callable[..., Any], policy: str) -> Callable[..., Any]:
  """`fn(module, *args)` rematerialised under `config.model.remat` ("none", "full", "dots").

  The module is split into its graph definition and state outside the checkpoint and merged
  again inside it, so the checkpointed function is pure: `nnx.remat` instead writes the
  module's Params back after the checkpoint, which fails inside `jax.value_and_grad` under
  `jax.jit` ("Cannot mutate Param from a different trace level"). `module` must hold no
  state that `fn` updates (the transformer layers hold parameters only).
  """
  if policy == "none":
    return fn
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; known: none, {', '.join(REMAT_POLICIES)}")

  def call(module: nnx.Module, *args: Any) -> Any:
    graphdef, state = nnx.split(module)

    def pure(state: nnx.State, *args: Any) -> Any:
      return fn(nnx.merge(graphdef, state), *args)

    return jax.checkpoint(pure, policy=REMAT_POLICIES[policy])(state, *args)

  return call


LAYERS = "layers"  # logical name of the stacked-layer axis
# Attributes that hold a stack (`stack_modules`) in a parameter path: the CLIP and LLaMA layers,
# the blocks of a ConvNeXt stage, the mask decoder's three kinds of layer. Unrolled, a layer index
# follows them ('.../layers/3/...').
STACK_ATTRIBUTES = ("layers", "blocks", "transformer_cross_attention_layers",
                    "transformer_self_attention_layers", "transformer_ffn_layers")


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """Modules of one structure -> one module of that structure whose every variable `[*shape]`
  becomes the stack of theirs, `[len(modules), *shape]`, its leading axis named `layers`.

  The modules are created one by one (the unrolled way) before stacking, so a scanned model
  starts from exactly the parameters of the unrolled model built with the same rngs. The first
  module is reused as the stack; the others are left as they are.
  """
  first = modules[0]
  states = [nnx.state(m) for m in modules]
  paths = [dict(jax.tree_util.tree_leaves_with_path(s, is_leaf=_is_variable)) for s in states]
  for path, var in paths[0].items():
    names = var.get_metadata().get("out_sharding")
    if not names:
      raise ValueError(f"stacked variable {path} has no logical axis names")
    var.set_value(jnp.stack([p[path].get_value() for p in paths]))
    var.set_metadata(out_sharding=(LAYERS,) + tuple(names))
  return first


def _stack_at(parts: list[str]) -> int | None:
  """Index of the path component holding a stack: a `STACK_ATTRIBUTES` name followed by a
  parameter name, not by a layer index."""
  for i, part in enumerate(parts[:-1]):
    if part in STACK_ATTRIBUTES and not parts[i + 1].isdigit():
      return i
  return None


def layer_path(path: str, index: int) -> str:
  """The unrolled path of layer `index` of a stacked parameter: the stack's component gains the
  index ('model/layers/mlp/up_proj/kernel', 3 -> 'model/layers/3/mlp/up_proj/kernel';
  'stages/2/blocks/gamma', 5 -> 'stages/2/blocks/5/gamma')."""
  parts = path.split("/")
  at = _stack_at(parts)
  if at is None:
    raise ValueError(f"{path!r} is not under a stack ({', '.join(STACK_ATTRIBUTES)})")
  return "/".join(parts[:at + 1] + [str(index)] + parts[at + 1:])


def is_stacked_path(path: str) -> bool:
  """Whether a saved parameter path is a stacked layer's: a `STACK_ATTRIBUTES` component
  followed by a name, not a layer index ('llm/model/layers/mlp/up_proj/kernel', not
  '.../layers/3/...' nor the mask decoder's 'seg_proj/layers/0/kernel')."""
  return _stack_at(path.split("/")) is not None


def is_stacked(var: nnx.Variable) -> bool:
  """Whether `var` is a stacked-layer parameter (leading logical axis `layers`)."""
  names = var.get_metadata().get("out_sharding")
  return bool(names) and names[0] == LAYERS


def unstacked(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.Module:
  """One layer of a stack (`nnx.split` of a `stack_modules` module): `state` holds its slices
  (no `layers` axis); their logical names lose the leading `layers` too."""
  layer = nnx.merge(graphdef, state)
  for _, var in nnx.iter_graph(layer):
    if _is_variable(var) and is_stacked(var):
      var.set_metadata(out_sharding=var.get_metadata()["out_sharding"][1:])
  return layer


def scan_layers(fn: Callable[..., tuple[Any, Any]], stacked: nnx.Module, carry: Any, *args: Any,
                policy: str = "none") -> tuple[Any, Any]:
  """Applies the layers of `stacked` (`stack_modules`) in order with `jax.lax.scan`.

  `fn(layer, carry, *args) -> (carry, y)` is called once per layer; `args` are the same for
  every layer. The remat `policy` applies to each layer inside the scan body. The stack is split
  into its graph definition and state outside the scan and merged per layer inside (a pure scan
  body, as `remat` needs under jit and grad). Layers must hold no state that `fn` updates.

  Returns:
    the final carry and the `y`s stacked on a leading `[num_layers]` axis.
  """
  graphdef, state = nnx.split(stacked)
  call = remat(fn, policy)

  def body(carry, layer_state):
    return call(unstacked(graphdef, layer_state), carry, *args)

  return jax.lax.scan(body, carry, state)


def parse_dtype(name: Any) -> Any:
  """Config dtype string ('float32', 'bfloat16', ...) -> jnp dtype; None stays None."""
  if name is None or not isinstance(name, str):
    return name
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"unknown dtype {name!r} in config") from e


def batch_local(fn: Callable[..., jax.Array], x: jax.Array, *replicated: Any) -> jax.Array:
  """`fn(x, *replicated)` computed per device on its own rows of `x` `[batch, ...]`, the
  `replicated` arguments (e.g. a module's parameters) whole on every device.

  The mesh is the one the caller traces under (`jax.set_mesh`) and the rows are split as the
  logical axis "activation_batch" maps under the current rules (`nnx.logical_axis_rules`);
  `unires_jax.parallel.on_mesh` sets both, so no model module names a mesh axis. Outside a mesh
  this is `fn(x, *replicated)`. Differentiating it sums the replicated arguments' gradients over
  the batch shards (`jax.shard_map`'s transpose), a path that does not rely on XLA's partitioner.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(x, *replicated)
  rows = PartitionSpec(dividing_mesh_axes("activation_batch", x.shape[0]) or None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(rows,) + (PartitionSpec(),) * len(replicated),
                       out_specs=rows)(x, *replicated)
