"""The jitted train step, with explicit in/out shardings (the prediction function, which needs
no optimizer, is `unires_jax.parallel.make_predict`).

One step: split the global batch into `config.train.accum_steps` micro-batches, sum their
gradients in a `lax.scan` (memory holds one micro-batch of activations) and average, clip, update
with AdamW. A non-finite loss or gradient norm keeps the old parameters and optimizer state and
is counted. The state is donated: its buffers are reused for the new state.

With accumulation, the loss is the mean of the micro-batches' losses, each normalised within
its micro-batch (as every accumulating trainer does); it equals the full-batch loss when the
micro-batches hold equal numbers of answer tokens and mask targets.

LoRA dropout (`config.model.llm.lora.dropout`) draws from a key folded from `config.train.seed`,
the step and the micro-batch: a resumed run drops what the uninterrupted one would.

`config.train.exec_time_optimization_effort` (XLA's effort on the step's run time, -1..1, 0 the
compiler's default) is passed to the step's compile (`compiler_options`).
"""

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from unires_jax import parallel
from unires_jax.models import lora as lora_lib
from unires_jax.models.unires import INPUT_KEYS, LOSS_KEYS, compute_loss, train_forward
from unires_jax.train import optimizer as optimizer_lib
from unires_jax.train.state import StateFactory, TrainState

Batch = Mapping[str, jax.Array]
MODEL_KEYS = INPUT_KEYS + LOSS_KEYS


def model_fields(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The fields the model and its loss read (a pipeline batch also carries bookkeeping)."""
  missing = [k for k in MODEL_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing field {missing[0]!r} (needs {MODEL_KEYS})")
  return {k: batch[k] for k in MODEL_KEYS}


def exec_time_effort(config) -> float:
  """`config.train.exec_time_optimization_effort`, checked (absent in configs written before
  it: 0, the compiler's default).

  Lower effort compiles faster and may run slower: the 7B recipe's step for v5p:4x4x4 compiles
  in 139 s at -1 against 362 s at 0 on a 2-core host, but the program at -1 (at -0.5 and
  below in libtpu 0.0.42.1) has no memory-space assignment: nothing is placed in VMEM or
  prefetched (docs/tpu.md, "Compile time").
  """
  effort = config.train.get("exec_time_optimization_effort", 0.0)
  if isinstance(effort, bool) or not isinstance(effort, (int, float)) or not -1 <= effort <= 1:
    raise ValueError("config.train.exec_time_optimization_effort must be a number in "
                     f"[-1, 1], got {effort!r}")
  return float(effort)


def compiler_options(config) -> dict[str, float] | None:
  """The train step's XLA compile options (`exec_time_effort`); None at the default."""
  effort = exec_time_effort(config)
  return {"exec_time_optimization_effort": effort} if effort else None


def _micro_batches(batch: Batch, accum_steps: int) -> Batch:
  """`[batch, ...]` -> `[accum_steps, batch / accum_steps, ...]`. Micro-batch j holds rows
  j, j + accum_steps, ...: every device keeps its own rows, nothing moves between devices."""
  out = {}
  for key, value in batch.items():
    b = value.shape[0]
    if b % accum_steps:
      raise ValueError(f"batch[{key!r}] has {b} rows, not divisible by "
                       f"config.train.accum_steps={accum_steps}")
    out[key] = jnp.moveaxis(value.reshape(b // accum_steps, accum_steps, *value.shape[1:]), 1, 0)
  return out


def _adam_count(opt_state) -> jax.Array:
  """Updates applied so far: the count of the first Adam state (all trainable groups agree)."""
  for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
    if isinstance(s, optax.ScaleByAdamState):
      return s.count
  return jnp.zeros((), jnp.int32)


def make_train_step(
    factory: StateFactory) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`(state, batch) -> (state, metrics)`, jitted on `factory.mesh` with the state donated.

  `batch` holds `MODEL_KEYS` as global arrays sharded over `data` x `fsdp`
  (`parallel.shard_batch` of `model_fields(...)`). Metrics (replicated scalars): `loss`, its
  parts, `grad_norm`, `learning_rate` (multiplier 1), `finite` (1 when the update was applied),
  `nonfinite_in_row`, `nonfinite_total`.
  """
  config, graphdef, tx = factory.config, factory.graphdef, factory.tx
  multipliers = factory.multipliers
  lora = lora_lib.read_lora_config(config.model.llm.get("lora"))
  dropout = lora.enabled and lora.dropout > 0
  accum_steps = int(config.train.accum_steps)
  if accum_steps < 1:
    raise ValueError(f"config.train.accum_steps must be >= 1, got {accum_steps}")
  schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.train.num_steps)
  aux_loss = bool(config.model.mask_decoder.aux_loss)

  def loss_fn(trainable, frozen, batch, key):
    model = nnx.merge(graphdef, trainable, frozen)
    with lora_lib.dropout_key(key if dropout else None):
      outputs = train_forward(model, batch)
    with jax.named_scope("losses"):
      return compute_loss(outputs, batch, config.model.loss, aux_loss=aux_loss)

  def gradients(trainable, frozen, batch, key):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, batch, key)
    return loss, parts, grads

  def accumulated(trainable, frozen, batch, key):
    micro = _micro_batches(batch, accum_steps)
    shapes = jax.eval_shape(gradients, trainable, frozen,
                            jax.tree_util.tree_map(lambda x: x[0], micro), key)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, one):
      one, j = one
      grads = gradients(trainable, frozen, one, jax.random.fold_in(key, j))
      return jax.tree_util.tree_map(jnp.add, carry, grads), None

    sums, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    return jax.tree_util.tree_map(lambda x: x / accum_steps, sums)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    trainable, frozen = optimizer_lib.split_trainable(state.params, multipliers)
    compute = gradients if accum_steps == 1 else accumulated
    key = jax.random.fold_in(jax.random.key(config.train.seed), state.step)
    loss, parts, grads = compute(trainable, frozen, batch, key)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    learning_rate = schedule(_adam_count(state.opt_state))
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, trainable)
      new = (optax.apply_updates(trainable, updates), opt_state)
      trainable, opt_state = jax.tree_util.tree_map(
          lambda n, o: jnp.where(finite, n, o), new, (trainable, state.opt_state))
    in_row = jnp.where(finite, 0, state.nonfinite_in_row + 1)
    state = TrainState(
        step=state.step + 1, params=nnx.merge_state(trainable, frozen), opt_state=opt_state,
        nonfinite_in_row=in_row,
        nonfinite_total=state.nonfinite_total + 1 - finite.astype(jnp.int32))
    metrics = {"loss": loss, **parts, "grad_norm": grad_norm,
               "learning_rate": learning_rate,
               "finite": finite.astype(jnp.int32), "nonfinite_in_row": in_row,
               "nonfinite_total": state.nonfinite_total}
    return state, metrics

  replicated = NamedSharding(factory.mesh, PartitionSpec())
  return parallel.on_mesh(factory.mesh, factory.model.rules, jax.jit(
      step, in_shardings=(factory.shardings, parallel.batch_sharding(factory.mesh)),
      out_shardings=(factory.shardings, replicated), donate_argnums=(0,),
      compiler_options=compiler_options(config)))
