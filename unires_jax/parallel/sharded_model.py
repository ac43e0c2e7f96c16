"""A model on a mesh: its parameters abstract, sharded and initialised, and its jitted forward.

Parameters are created where they live: the init runs under `jax.jit` with the shardings the
rules give as `out_shardings`, so no host ever holds a full copy of the model. Nothing here knows
an optimizer: evaluation and inference use `ShardedModel` and `make_predict` alone, training
builds its state around them (`unires_jax.train.state`).
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from unires_jax import models, sharding
from unires_jax.models import layers, quantize
from unires_jax.parallel import batched_threefry
from unires_jax.parallel import mesh as mesh_lib
from unires_jax.parallel import rules

Batch = Mapping[str, jax.Array]


def build(config: ml_collections.ConfigDict) -> nnx.Module:
  """The model of `config`, initialised from `config.train.seed`; with `config.model.quantize`
  its linear layers quantized (`models.quantize`: call it under `jax.jit` or `nnx.eval_shape`
  then)."""
  return quantize.quantize(models.build_model(config, layers.ParamKeys(config.train.seed)),
                           config.model)


def abstract_model(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's static graph and its parameters as ShapeDtypeStructs (nothing allocated)."""
  model = nnx.eval_shape(lambda: build(config))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree_util.tree_leaves(rest):
    raise ValueError("the model holds non-parameter state, which checkpoints do not carry")
  return graphdef, params


class ShardedModel:
  """The model of `config` on `mesh`.

  Attributes:
    graphdef: the model's static graph (`nnx.merge(graphdef, params)` is the model).
    abstract: its parameters (`nnx.State`) as ShapeDtypeStructs.
    shardings: the `NamedSharding` of every parameter, from its logical axis names and the rules.
    rules: `config.logical_axis_rules` (`rules.from_config`), which `on_mesh` traces under.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    self.config, self.mesh = config, mesh
    self.rules = rules.from_config(config)
    self.graphdef, self.abstract = abstract_model(config)
    self.shardings = rules.state_shardings(self.abstract, mesh, self.rules)

  def init_params(self) -> nnx.State:
    """Freshly initialised parameters (traceable: call it under `jax.jit`).

    On the CPU all keys are hashed in one threefry call and all draws in another
    (`batched_threefry`: the same bits; the tiny model's init compiles in 8 s instead of 19 on
    8 CPU devices). Elsewhere each parameter's draw stays its own, sharded like the parameter.
    """
    init = lambda: nnx.state(build(self.config), nnx.Param)
    if self.mesh.devices.flat[0].platform == "cpu":
      return batched_threefry.batch_threefry(init)()
    return init()

  def create(self) -> nnx.State:
    """Freshly initialised parameters, each created directly with its sharding."""
    return jax.jit(self.init_params, out_shardings=self.shardings)()

  def abstract_sharded(self) -> nnx.State:
    """The parameters as ShapeDtypeStructs carrying this mesh's shardings (a restore target,
    `unires_jax.checkpoint.restore_params`)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract, self.shardings)


  def quantized(self, float_graphdef: nnx.GraphDef, float_params: nnx.State) -> nnx.State:
    """This model's parameters from `float_params` (sharded, donated): the same config's model
    unquantized (`float_graphdef`), its linear layers quantized as `config.model.quantize` says
    (`models.quantize`), each array created directly with its sharding."""
    cfg = self.config.model
    to_quantized = lambda params: nnx.state(
        quantize.quantize(nnx.merge(float_graphdef, params), cfg), nnx.Param)
    return jax.jit(to_quantized, out_shardings=self.shardings, donate_argnums=0)(float_params)


def on_mesh(mesh: Mesh, axis_rules: sharding.Rules, jitted):
  """`jitted`, traced under `mesh` and the logical axis rules (`nnx.logical_axis_rules`): model
  code that lays out activations (`unires_jax.sharding.constrain`) or works per device
  (`layers.batch_local`) reads both from there."""

  def call(*args):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(axis_rules):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(axis_rules):
      return jitted.lower(*args)

  call.lower = lower  # AOT use (cost analysis, benchmarks), as on the jitted function
  return call


def make_predict(model: ShardedModel) -> Callable[[nnx.State, Batch], dict[str, jax.Array]]:
  """`(params, batch) -> {"mask_logits": [batch, s_high, s_high], "no_target_logits": [batch]}`.

  `batch` holds `unires_jax.models.unires.INPUT_KEYS`. Mask logits are upsampled (bilinear) from
  the decoder's 1/4 resolution to the letterboxed high-resolution view; outputs are sharded over
  the batch.
  """
  graphdef, size = model.graphdef, model.config.model.convnext.image_size

  def predict(params: Any, batch: Batch) -> dict[str, jax.Array]:
    out = nnx.merge(graphdef, params)(batch)
    logits = jax.image.resize(out.mask_logits.astype(jnp.float32),
                              (out.mask_logits.shape[0], size, size), "bilinear")
    return {"mask_logits": logits, "no_target_logits": out.no_target_logits.astype(jnp.float32)}

  rows = mesh_lib.batch_sharding(model.mesh)
  return on_mesh(model.mesh, model.rules, jax.jit(
      predict, in_shardings=(model.shardings, rows), out_shardings=rows))
