"""The LLaMA decoder (UniRES++'s LLM: Vicuna-7B v1.5 in the full config), with a KV cache.

Computes what `transformers.LlamaForCausalLM` computes: RMSNorm in float32, rotary position
embeddings in the rotate-half convention, grouped-query attention and a SwiGLU MLP. Module and
parameter names mirror transformers' (`model/layers/0/self_attn/q_proj/kernel`), so the importer
in `unires_jax.convert.llama` is a table of name rules.

Padding: `attention_mask` marks real tokens with 1. Attention is causal over positions in the
sequence (or cache slots) and skips padded keys; rotary positions count real tokens only, so
left- and right-padded batches give every real token the logits it would get unpadded.

Attention (`config.model.llm.attention`, `unires_jax.kernels.llm_attention`): "xla" is the
einsum below with a dense mask; "cudnn" (GPU) and "splash" (TPU) are fused kernels for whole
sequences. With a KV cache (generation) every choice runs the einsum: the kernels' causal mask
has no cache offset.

KV cache: `KVCache` holds, per layer, preallocated keys and values `[batch, max_len, kv_heads,
head_dim]`, the number of slots written so far and which slots hold real tokens. All shapes are
static, so a decoding step jits once and runs in a `lax` loop (see `unires_jax.models.generate`).

Scanned layers (`scan_layers=True`, `config.model.scan_layers`): the decoder layers are one
stacked `LlamaDecoderLayer` (`model/layers/self_attn/q_proj/kernel` is `[num_layers, ...]`,
leading axis `layers`) applied with `jax.lax.scan`. Its cache stacks the layers too: keys and
values are single arrays `[num_layers, batch, max_len, kv_heads, head_dim]`, carried through the
scan and updated in place at each layer's index.
"""

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from unires_jax.kernels import llm_attention
from unires_jax import sharding
from unires_jax.models import layers
from unires_jax.models import lora as lora_lib

class LlamaConfig(NamedTuple):
  """The fields of `config.model.llm` (hashable, so it can live in a GraphDef): the
  architecture, and the attention implementation (optional, "xla" by default)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  max_position_embeddings: int
  tie_word_embeddings: bool
  attention: str = "xla"


def read_llm_config(cfg: Mapping[str, Any]) -> LlamaConfig:
  """`config.model.llm` (a ConfigDict or dict) -> `LlamaConfig`, checked for consistency."""
  optional = LlamaConfig._field_defaults
  missing = [name for name in LlamaConfig._fields if name not in cfg and name not in optional]
  if missing:
    raise ValueError(f"llm config lacks field {missing[0]!r}")
  out = LlamaConfig(**{name: cfg[name] for name in LlamaConfig._fields if name in cfg})
  llm_attention.check(out.attention)
  if out.num_heads % out.num_kv_heads:
    raise ValueError(
        f"llm config: num_heads={out.num_heads} is not a multiple of "
        f"num_kv_heads={out.num_kv_heads}"
    )
  if out.head_dim % 2:
    raise ValueError(f"llm config: head_dim={out.head_dim} must be even for rotary embeddings")
  return out


class KVCache(NamedTuple):
  """Keys and values of every layer for the tokens seen so far (a pytree of arrays).

  Attributes:
    keys: per layer, `[batch, max_len, kv_heads, head_dim]`, rotary embedding applied: a tuple
      of such arrays, or (scanned layers) one array `[num_layers, batch, max_len, kv_heads,
      head_dim]`.
    values: per layer, `[batch, max_len, kv_heads, head_dim]`, laid out as `keys`.
    length: int32 scalar, slots `[0, length)` are written (the same for every row).
    mask: `[batch, max_len]` bool, True where a written slot holds a real (non-pad) token.
  """

  keys: tuple[jax.Array, ...] | jax.Array
  values: tuple[jax.Array, ...] | jax.Array
  length: jax.Array
  mask: jax.Array

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis; normalises in float32, scales in the compute dtype."""

  def __init__(self, features: int, *, epsilon: float, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    del rngs  # The scale starts at one.
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), **layers.axes("embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., features]` -> same shape, in the compute dtype (else x's dtype)."""
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    # transformers rounds to the input dtype before the scale, not after.
    return self.scale[...].astype(dtype) * normed.astype(dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention: x `[b, t, heads, d]`, positions `[b, t]`."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [b, t, 1, d]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class LlamaAttention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings; no biases."""

  def __init__(self, cfg: LlamaConfig, *, lora: lora_lib.LoRAConfig = lora_lib.LoRAConfig(),
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads
    self.head_dim = cfg.head_dim
    self.rope_theta = cfg.rope_theta
    self.attention = cfg.attention
    e = cfg.hidden_size
    q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = lora_lib.linear("q_proj", lora, e, q_width, ("embed", "heads"), **kw)
    self.k_proj = lora_lib.linear("k_proj", lora, e, kv_width, ("embed", "kv_heads"), **kw)
    self.v_proj = lora_lib.linear("v_proj", lora, e, kv_width, ("embed", "kv_heads"), **kw)
    self.o_proj = lora_lib.linear("o_proj", lora, q_width, e, ("heads", "embed"), **kw)

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      mask: jax.Array,
      kv: tuple[jax.Array, jax.Array] | None = None,
      start: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends `x` `[b, t, e]` to itself, or to the cache `kv` after writing at slot `start`.

    Args:
      x: `[b, t, e]` hidden states.
      positions: `[b, t]` rotary positions.
      mask: `[b, t, s]` bool, True where query i may attend to key j (s = t, or the cache
        length); for a kernel (`attention` not "xla", no cache) `[b, t]` bool, True at real
        tokens, the causal rule implied.
      kv: the cache's (keys, values), each `[b, s, kv_heads, head_dim]`, or None.
      start: int32 scalar, the slot of x's first token in the cache.

    Returns:
      `[b, t, e]` and the updated (keys, values), or None without a cache.
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    if kv is None and self.attention != "xla":
      out = llm_attention.causal_attention(q, k, v, mask, impl=self.attention)
      return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), None
    if kv is not None:
      at = (0, start, 0, 0)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), at)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), at)
      kv = (k, v)
    # Query head h reads key/value head h // group (transformers' repeat_kv order).
    group = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, group, self.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores * self.head_dim**-0.5
    # A finite floor keeps rows with no visible key (padding queries) free of NaNs.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype))
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), kv


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: LlamaConfig, *, lora: lora_lib.LoRAConfig = lora_lib.LoRAConfig(),
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    e, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = lora_lib.linear("gate_proj", lora, e, m, ("embed", "mlp"), **kw)
    self.up_proj = lora_lib.linear("up_proj", lora, e, m, ("embed", "mlp"), **kw)
    self.down_proj = lora_lib.linear("down_proj", lora, m, e, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: LlamaConfig, *, lora: lora_lib.LoRAConfig = lora_lib.LoRAConfig(),
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    e, eps = cfg.hidden_size, cfg.rms_norm_eps
    self.input_layernorm = RMSNorm(e, epsilon=eps, **kw)
    self.self_attn = LlamaAttention(cfg, lora=lora, **kw)
    self.post_attention_layernorm = RMSNorm(e, epsilon=eps, **kw)
    self.mlp = LlamaMLP(cfg, lora=lora, **kw)

  def __call__(self, x, positions, mask, kv=None, start=None):
    """`[b, t, e]` -> `[b, t, e]` and the layer's updated cache; see `LlamaAttention`."""
    h, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, start)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, "activation_batch", "activation_length", "activation_embed"), kv


def _call_layer(layer, *args):
  return layer(*args)


def _scan_body(layer, carry, positions, mask):
  """One scanned layer without a cache: (`[b, t, e]`, layer index) -> the same, None; the
  index gives the layer its own adapter-dropout key (`lora.layer_scope`)."""
  x, i = carry
  with lora_lib.layer_scope(i):
    return (layer(x, positions, mask)[0], i + 1), None


def _cached_scan_body(layer, carry, positions, mask, start):
  """One scanned layer with the stacked cache in the carry: (x, keys, values, index) -> same,
  the layer's cache slices read and written at `index`."""
  x, keys, values, i = carry
  kv = (jax.lax.dynamic_index_in_dim(keys, i, keepdims=False),
        jax.lax.dynamic_index_in_dim(values, i, keepdims=False))
  x, (k, v) = layer(x, positions, mask, kv, start)
  keys = jax.lax.dynamic_update_index_in_dim(keys, k, i, 0)
  values = jax.lax.dynamic_update_index_in_dim(values, v, i, 0)
  return (x, keys, values, i + 1), None


class LlamaModel(nnx.Module):
  """Token embeddings, decoder layers and the final norm (transformers' `model.`)."""

  def __init__(self, cfg: LlamaConfig, *, vocab_size: int, dtype=None, param_dtype=jnp.float32,
               remat: str = "none", scan_layers: bool = False,
               lora: lora_lib.LoRAConfig = lora_lib.LoRAConfig(), rngs: nnx.Rngs):
    e = cfg.hidden_size
    self.remat = remat  # rematerialises each decoder layer in training (no cache)
    self.attention = cfg.attention
    self.scan_layers = scan_layers
    self.embed_tokens = nnx.Embed(
        vocab_size,
        e,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02),
        embedding_metadata=layers.axes("vocab", "embed"),
        rngs=rngs,
    )
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    decoder = [LlamaDecoderLayer(cfg, lora=lora, **kw) for _ in range(cfg.num_layers)]
    self.layers = layers.stack_modules(decoder) if scan_layers else nnx.List(decoder)
    self.norm = RMSNorm(e, epsilon=cfg.rms_norm_eps, **kw)

  def __call__(
      self,
      inputs_embeds: jax.Array,
      attention_mask: jax.Array,
      positions: jax.Array | None,
      cache: KVCache | None,
  ) -> tuple[jax.Array, KVCache | None]:
    """`[b, t, e]` embeddings, `[b, t]` mask -> normed hidden states `[b, t, e]`, cache."""
    t = inputs_embeds.shape[1]
    valid = attention_mask.astype(bool)
    if cache is None:
      seen = jnp.zeros(valid.shape[:1], jnp.int32)
      key_valid = valid
      query_slot = key_slot = jnp.arange(t)
      start = None
    else:
      if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) + t > cache.max_len:
        raise ValueError(
            f"cache holds {cache.max_len} slots, {int(cache.length)} used: no room for {t} tokens"
        )
      seen = cache.mask.sum(axis=-1, dtype=jnp.int32)
      start = cache.length
      key_valid = jax.lax.dynamic_update_slice(cache.mask, valid, (0, start))
      query_slot = start + jnp.arange(t)
      key_slot = jnp.arange(cache.max_len)
    if positions is None:
      # As transformers' generate: count real tokens; padding gets position 0.
      positions = jnp.maximum(seen[:, None] + jnp.cumsum(valid, axis=-1) - 1, 0)
    if cache is None and self.attention != "xla":
      mask = valid  # the kernels take the real tokens `[b, t]` and imply causality
    else:
      # Slot order is sequence order, so causality is a comparison of slots.
      mask = (key_slot[None, :] <= query_slot[:, None])[None] & key_valid[:, None, :]

    if self.scan_layers:
      x, cache = self._scan(inputs_embeds, positions, mask, cache, start)
    else:
      x, cache = self._unrolled(inputs_embeds, positions, mask, cache, start)
    if cache is not None:
      cache = KVCache(cache[0], cache[1], start + t, key_valid)
    return self.norm(x), cache


  def _unrolled(self, x, positions, mask, cache, start):
    """The layers one after the other: `[b, t, e]` -> `[b, t, e]`, (keys, values) tuples."""
    keys, values = [], []
    call = _call_layer if cache is not None else layers.remat(_call_layer, self.remat)
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      with lora_lib.layer_scope(i):
        x, kv = call(layer, x, positions, mask, kv, start)
      if kv is not None:
        keys.append(kv[0])
        values.append(kv[1])
    return x, None if cache is None else (tuple(keys), tuple(values))

  def _scan(self, x, positions, mask, cache, start):
    """The stacked layers in a scan: `[b, t, e]` -> `[b, t, e]`, stacked (keys, values)."""
    if cache is None:
      (x, _), _ = layers.scan_layers(_scan_body, self.layers, (x, jnp.zeros((), jnp.int32)),
                                     positions, mask, policy=self.remat)
      return x, None
    carry = (x, cache.keys, cache.values, jnp.zeros((), jnp.int32))
    (x, keys, values, _), _ = layers.scan_layers(
        _cached_scan_body, self.layers, carry, positions, mask, start)
    return x, (keys, values)


class LlamaForCausalLM(nnx.Module):
  """LLaMA with its LM head, built from `config.model.llm`.

  `vocab_size` overrides the config's vocabulary (UniRES++ appends its special tokens as rows).
  `scan_layers` stacks the decoder layers and scans over them (see the module docstring).

  With LoRA (`cfg["lora"]`, `unires_jax.models.lora`) the targeted projections carry adapters,
  and the rows beyond the config's vocabulary get parameters of their own that replace the
  table's (`new_token_embedding` `[added, hidden]`, and `new_token_head` `[hidden, added]`
  unless the embeddings are tied; PEFT's trainable tokens): they start as copies of those rows,
  and train while the LLM's own weights stay frozen.
  """

  def __init__(
      self,
      cfg: Mapping[str, Any],
      *,
      vocab_size: int | None = None,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      remat: str = "none",
      scan_layers: bool = False,
      rngs: nnx.Rngs,
  ):
    self.config = read_llm_config(cfg)
    self.vocab_size = vocab_size or self.config.vocab_size
    self.tie_word_embeddings = bool(self.config.tie_word_embeddings)
    self.dtype = dtype
    self.lora = lora_lib.read_lora_config(cfg.get("lora"))
    self.model = LlamaModel(
        self.config, vocab_size=self.vocab_size, dtype=dtype, param_dtype=param_dtype,
        remat=remat, scan_layers=scan_layers, lora=self.lora, rngs=rngs)
    if not self.tie_word_embeddings:
      self.lm_head = layers.linear(
          self.config.hidden_size,
          self.vocab_size,
          ("embed", "vocab"),
          rngs=rngs,
          use_bias=False,
          dtype=dtype,
          param_dtype=param_dtype,
      )
    base = self.config.vocab_size
    new_rows = self.lora.enabled and self.vocab_size > base
    self.new_token_embedding = nnx.LoRAParam(
        self.model.embed_tokens.embedding[...][base:], **layers.axes("vocab", "embed")
    ) if new_rows else None
    self.new_token_head = nnx.LoRAParam(
        self.lm_head.kernel[...][:, base:], **layers.axes("embed", "vocab")
    ) if new_rows and not self.tie_word_embeddings else None

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings: `[b, t]` int -> `[b, t, hidden_size]`."""
    x = self.model.embed_tokens(input_ids)
    if self.new_token_embedding is None:
      return x
    base, rows = self.config.vocab_size, self.new_token_embedding[...]
    new = jnp.take(rows, jnp.clip(input_ids - base, 0, rows.shape[0] - 1), axis=0)
    return jnp.where((input_ids >= base)[..., None], new.astype(x.dtype), x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """LM logits: `[..., hidden_size]` -> `[..., vocab]`."""
    if self.tie_word_embeddings:
      logits = self.model.embed_tokens.attend(hidden)
      new = None if self.new_token_embedding is None else self.new_token_embedding[...].T
    else:
      logits = self.lm_head(hidden)
      new = None if self.new_token_head is None else self.new_token_head[...]
    if new is None:
      return logits
    dtype = self.dtype or hidden.dtype
    added = (hidden.astype(dtype) @ new.astype(dtype)).astype(logits.dtype)
    return jnp.concatenate([logits[..., :self.config.vocab_size], added], axis=-1)

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for `max_len` tokens per row (prompt and generated)."""
    dtype = dtype or self.dtype or jnp.float32
    shape = (batch_size, max_len, self.config.num_kv_heads, self.config.head_dim)
    n = self.config.num_layers
    if self.model.scan_layers:
      keys = values = jnp.zeros((n, *shape), dtype)
    else:
      keys = values = tuple(jnp.zeros(shape, dtype) for _ in range(n))
    return KVCache(
        keys=keys,
        values=values,
        length=jnp.zeros((), jnp.int32),
        mask=jnp.zeros((batch_size, max_len), bool),
    )

  def __call__(
      self,
      input_ids: jax.Array | None = None,
      *,
      inputs_embeds: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      positions: jax.Array | None = None,
      cache: KVCache | None = None,
      logit_positions: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array, KVCache | None]:
    """Runs the decoder on token ids or embeddings.

    Args:
      input_ids: `[b, t]` token ids; exactly one of `input_ids` and `inputs_embeds`.
      inputs_embeds: `[b, t, hidden_size]`, e.g. `embed(ids)` with image features spliced in.
      attention_mask: `[b, t]`, 1 for tokens and 0 for padding; default all ones.
      positions: `[b, t]` rotary positions; default counts the real tokens (after the cache's).
      cache: a `KVCache` from `init_cache` (or a previous call) to append these tokens to.
      logit_positions: `[b, n]` int, the positions to compute logits at (training computes
        them at the answer only); default every position.

    Returns:
      logits `[b, t, vocab]` (`[b, n, vocab]` with `logit_positions`), hidden states after the
      final norm `[b, t, hidden_size]`, and the updated cache (None without one).
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones(inputs_embeds.shape[:2], jnp.int32)
    if attention_mask.shape != inputs_embeds.shape[:2]:
      raise ValueError(
          f"attention_mask has shape {attention_mask.shape}, expected {inputs_embeds.shape[:2]}"
      )
    hidden, cache = self.model(inputs_embeds, attention_mask, positions, cache)
    at = hidden
    if logit_positions is not None:
      at = jnp.take_along_axis(hidden, logit_positions[..., None], axis=1)
    return self.logits(at), hidden, cache
