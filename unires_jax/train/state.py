"""The train state, created sharded on the mesh around the model's sharded parameters
(`unires_jax.parallel.ShardedModel`): the optimizer is built here, for training only."""

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from unires_jax import checkpoint, parallel, utils
from unires_jax.models import quantize
from unires_jax.train import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (a pytree; checkpointed whole).

  step:              int32 [] train steps taken (skipped non-finite steps included)
  params:            nnx.State of the model's parameters (float32 master weights)
  opt_state:         optimizer state of the trainable parameters
  nonfinite_in_row:  int32 [] steps skipped in a row for a non-finite loss or gradient
  nonfinite_total:   int32 [] steps skipped in all
  """

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  nonfinite_in_row: jax.Array
  nonfinite_total: jax.Array


class StateFactory:
  """Builds the optimizer, the abstract state and the sharded state of a config on a mesh.

  Attributes:
    model: the `ShardedModel` (graph, parameter shardings, the predict function's source).
    multipliers: the learning-rate multipliers (`optimizer.multipliers_of`; 0 freezes).
    tx: the optimizer of the trainable parameters.
    abstract: the `TrainState` as ShapeDtypeStructs; `shardings`: its `NamedSharding`s.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    if quantize.enabled(config.model):
      raise ValueError(f"config.model.quantize.weights={config.model.quantize.weights!r} is for "
                       "inference (unires-segment, unires-eval, unires-serve --quantize); "
                       "training keeps float weights: set it to 'none'")
    self.config, self.mesh = config, mesh
    self.model = parallel.ShardedModel(config, mesh)
    self.multipliers = optimizer_lib.multipliers_of(config)
    optimizer_lib.check_multipliers(self.model.abstract, self.multipliers)
    trainable, _ = optimizer_lib.split_trainable(self.model.abstract, self.multipliers)
    self.tx = optimizer_lib.make_optimizer(config.optimizer, config.train.num_steps, trainable,
                                           self.multipliers)
    self.abstract = jax.eval_shape(self._start_from, self.model.abstract)
    self.shardings = parallel.state_shardings(self.abstract, mesh, self.model.rules)

  @property
  def graphdef(self) -> nnx.GraphDef:
    return self.model.graphdef

  def _init(self) -> TrainState:
    return self._start_from(self.model.init_params())

  def _start_from(self, params: nnx.State) -> TrainState:
    trainable, _ = optimizer_lib.split_trainable(params, self.multipliers)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=self.tx.init(trainable),
                      nonfinite_in_row=zero, nonfinite_total=zero)

  def create(self, params: nnx.State | None = None) -> TrainState:
    """A state at step 0, every array created directly with its sharding: freshly initialised,
    or from `params` (placed as `shardings.params`, e.g. restored; donated)."""
    if params is None:
      return jax.jit(self._init, out_shardings=self.shardings)()
    return jax.jit(self._start_from, out_shardings=self.shardings, donate_argnums=0)(params)

  def params_from(self, path: str) -> nnx.State:
    """The parameters of the checkpoint under `path` (`config.train.init_from`), placed as
    `shardings.params`. With LoRA on, a checkpoint without adapters (released weights converted
    with LoRA off, a full fine-tune) gives the rest, and the adapters start fresh: B = 0 and the
    added vocabulary rows copies of the checkpoint's, so the run starts from its model."""
    target = self.model.abstract_sharded()
    adapters, base = nnx.split_state(target, nnx.LoRAParam, ...)
    wanted = {utils.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    saved = checkpoint.param_shapes(checkpoint.locate(path))
    if not wanted or any(p.removesuffix("/value") in saved for p in wanted):
      return checkpoint.restore_params(path, target)[0]
    restored, _ = checkpoint.restore_params(path, base)
    base_vocab = self.config.model.llm.vocab_size

    def fresh_adapters(params: nnx.State) -> nnx.State:
      fresh, _ = nnx.split_state(self.model.init_params(), nnx.LoRAParam, ...)
      llm, new = params["llm"], fresh["llm"]
      if "new_token_embedding" in new:
        new["new_token_embedding"].set_value(
            llm["model"]["embed_tokens"]["embedding"][...][base_vocab:])
      if "new_token_head" in new:
        new["new_token_head"].set_value(llm["lm_head"]["kernel"][...][:, base_vocab:])
      return fresh

    shardings, _ = nnx.split_state(self.model.shardings, nnx.LoRAParam, ...)
    fresh = jax.jit(fresh_adapters, out_shardings=shardings)(restored)
    return nnx.merge_state(restored, fresh)

  def abstract_sharded(self) -> TrainState:
    """The state as ShapeDtypeStructs carrying this mesh's shardings (an Orbax restore target)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract, self.shardings)
