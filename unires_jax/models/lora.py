"""Low-rank adapters (LoRA, Hu et al. 2021) on the LLM's projections, as PEFT computes them.

`config.model.llm.lora` (`LoRAConfig`): `rank` (0: off, the default), `alpha`, `dropout` and
`targets`, the projections adapted by their transformers names (default q_proj and v_proj, as
LISA). A targeted projection is a `LoRALinear`: its frozen `kernel` `[in, out]` plus
`lora_a` `[in, rank]` and `lora_b` `[rank, out]`, and computes

    y = x W + (alpha / rank) * dropout(x) A B

B starts at zero, so an adapted model starts equal to its base; A starts as PEFT's (kaiming
uniform, bound 1 / sqrt(in)). Adapters are `nnx.LoRAParam`s: the optimizer keeps them trainable
when it freezes the LLM (`unires_jax.train.optimizer`). The LLM's added vocabulary rows
(`LlamaForCausalLM.new_token_embedding` / `new_token_head`) are LoRAParams too.

Dropout acts on the adapter's input only, and only where training gives a key
(`dropout_key`): the train step sets one per step, each decoder layer folds in its index
(`layer_scope`) and each projection its target's index. Evaluation, export and generation set
none, so they are deterministic.
"""

import contextlib
import contextvars
from typing import Any, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from unires_jax.models import layers

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK_AXIS = "lora_rank"  # logical name of the adapters' rank dimension (never sharded)

# PEFT's kaiming_uniform_(a=sqrt(5)) on A: uniform in +-sqrt(1 / fan_in).
A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "lora_dropout_key", default=None)


class LoRAConfig(NamedTuple):
  """`config.model.llm.lora` (hashable, so modules keep it as static graph data)."""

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def read_lora_config(cfg: Mapping[str, Any] | None) -> LoRAConfig:
  """`config.model.llm.lora` (None: off) -> `LoRAConfig`, each bad value named by its field."""
  if cfg is None:
    return LoRAConfig()
  where = "config.model.llm.lora"
  unknown = sorted(set(cfg.keys()) - set(LoRAConfig._fields))
  if unknown:
    raise ValueError(f"{where} has no field {unknown[0]!r}; fields: {LoRAConfig._fields}")
  out = LoRAConfig(**{k: cfg[k] for k in LoRAConfig._fields if k in cfg})
  out = out._replace(targets=tuple(out.targets))
  if not isinstance(out.rank, int) or out.rank < 0:
    raise ValueError(f"{where}.rank={out.rank!r} must be an integer >= 0 (0: off)")
  if out.alpha <= 0:
    raise ValueError(f"{where}.alpha={out.alpha!r} must be positive")
  if not 0 <= out.dropout < 1:
    raise ValueError(f"{where}.dropout={out.dropout!r} must lie in [0, 1)")
  bad = [t for t in out.targets if t not in TARGETS]
  if bad:
    raise ValueError(f"{where}.targets: unknown projection {bad[0]!r}; known: {TARGETS}")
  if out.enabled and not out.targets:
    raise ValueError(f"{where}.targets is empty: name at least one of {TARGETS}")
  return out


@contextlib.contextmanager
def dropout_key(key: jax.Array | None) -> Iterator[None]:
  """Adapter dropout on, drawing from `key`, for the forward passes traced inside."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


@contextlib.contextmanager
def layer_scope(index: int | jax.Array) -> Iterator[None]:
  """Inside decoder layer `index` (an int, or a traced one in a scan): its own dropout key."""
  key = _DROPOUT_KEY.get()
  with dropout_key(None if key is None else jax.random.fold_in(key, index)):
    yield


class _KeptKey:
  """`rngs` for `nnx.Linear` that remembers the key of the kernel it draws."""

  def __init__(self, rngs):
    self._rngs, self.key = rngs, None

  def params(self) -> jax.Array:
    self.key = self._rngs.params()
    return self.key


class LoRALinear(nnx.Linear):
  """`nnx.Linear` (no bias) with a low-rank adapter; see the module docstring.

  The adapter's A is drawn from a key derived from the kernel's, so the base weights are those
  of the plain `layers.linear` built from the same rngs.
  """

  def __init__(self, in_features: int, out_features: int, names: tuple[str, str], *,
               target: str, lora: LoRAConfig, rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    kept = _KeptKey(rngs)
    super().__init__(in_features, out_features, use_bias=False, dtype=dtype,
                     param_dtype=param_dtype, kernel_init=layers.DEFAULT_KERNEL_INIT,
                     kernel_metadata=layers.axes(*names), rngs=kept)
    a_key = jax.random.fold_in(kept.key, 1)
    self.lora_a = nnx.LoRAParam(A_INIT(a_key, (in_features, lora.rank), param_dtype),
                                **layers.axes(names[0], RANK_AXIS))
    self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, out_features), param_dtype),
                                **layers.axes(RANK_AXIS, names[1]))
    self.scale = lora.scale
    self.dropout = lora.dropout
    self.salt = TARGETS.index(target)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., in]` -> `[..., out]`."""
    y = super().__call__(x)
    key = _DROPOUT_KEY.get()
    if key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt), 1 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
    dtype = self.dtype or x.dtype
    a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
    return y + (self.scale * ((x.astype(dtype) @ a) @ b)).astype(y.dtype)


def linear(target: str, lora: LoRAConfig, in_features: int, out_features: int,
           names: tuple[str, str], *, rngs, dtype: Any = None,
           param_dtype: Any = jnp.float32) -> nnx.Linear:
  """The LLM projection `target` without bias: a `LoRALinear` when `lora` adapts it, else
  `layers.linear` (kernel `[in_features, out_features]` named `names` either way)."""
  if lora.enabled and target in lora.targets:
    return LoRALinear(in_features, out_features, names, target=target, lora=lora, rngs=rngs,
                      dtype=dtype, param_dtype=param_dtype)
  return layers.linear(in_features, out_features, names, rngs=rngs, use_bias=False, dtype=dtype,
                       param_dtype=param_dtype)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """W + scale * A B: the kernel `[in, out]` of the plain projection that computes what the
  adapted one computes without dropout (numpy arrays in, numpy out too)."""
  return kernel + scale * (a @ b)
