"""Mask decoder: an FPN pixel decoder and a Mask2Former-style masked-attention query decoder.

The queries are the LLM's [SEG] hidden states (and, with `use_region_queries`, the LLM states of
the object/part tokens). Each decoder layer cross-attends to one FPN level under the previous
layer's predicted mask (Mask2Former's masked attention, through
`kernels.cross_attention.fine_grained_cross_attention`), then self-attends, then applies an FFN,
each followed by residual + LayerNorm (Mask2Former's post-norm order). Parameter names follow
Mask2Former's `MultiScaleMaskedTransformerDecoder` and MaskFormer's `BasePixelDecoder`, with
`nn.MultiheadAttention`'s fused in-projection split into q/k/v projections.
"""

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unires_jax.kernels.cross_attention import IMPLEMENTATIONS
from unires_jax.kernels.cross_attention import fine_grained_cross_attention
from unires_jax import sharding
from unires_jax.models import layers

NORM_EPS = 1e-5  # torch.nn.GroupNorm / LayerNorm default


class MaskDecoderOutput(NamedTuple):
  """What the mask decoder returns.

  mask_logits:     [batch, seg, H/4, W/4] float32, the last layer's prediction for the seg queries.
  aux_mask_logits: the earlier predictions (initial queries, then layers 0..L-2), same shape;
                   empty when the config's `aux_loss` is False.
  seg_queries:     [batch, seg, hidden_dim] final decoder states of the seg queries.
  """

  mask_logits: jax.Array
  aux_mask_logits: list[jax.Array]
  seg_queries: jax.Array


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """`F.interpolate(mode="nearest")` on [batch, h, w, c]: source index floor(i * in / out)."""
  rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
  cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
  return x[:, rows][:, :, cols]


def resize_mask_logits(mask_logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """`F.interpolate(mode="bilinear", align_corners=False)` on [batch, queries, h, w] -> [.., *size].

  No antialiasing, as in PyTorch, so downsampled logits are point samples of the prediction.
  """
  return jax.image.resize(
      mask_logits, (*mask_logits.shape[:2], *size), method="bilinear", antialias=False)


def sine_position_encoding(height: int, width: int, dim: int) -> jax.Array:
  """Mask2Former's `PositionEmbeddingSine(dim // 2, normalize=True)` -> [height, width, dim].

  The first dim/2 channels encode y, the rest x; within each, sin and cos of the normalised
  coordinate (pixel centres over (0, 2*pi]) interleave at frequencies 10000^(2i/(dim/2)).
  """
  if dim % 4:
    raise ValueError(f"hidden_dim must be a multiple of 4 for sine position encodings, got {dim}")
  feats = dim // 2
  eps, scale = 1e-6, 2 * math.pi
  y = (jnp.arange(1, height + 1, dtype=jnp.float32) - 0.5) / (height + eps) * scale
  x = (jnp.arange(1, width + 1, dtype=jnp.float32) - 0.5) / (width + eps) * scale
  dim_t = 10000.0 ** (2 * (jnp.arange(feats) // 2) / feats)

  def encode(coord):  # [n] -> [n, feats], channels (sin f0, cos f0, sin f1, cos f1, ...)
    angles = coord[:, None] / dim_t
    return jnp.stack([jnp.sin(angles[:, 0::2]), jnp.cos(angles[:, 1::2])], -1).reshape(-1, feats)

  pos_y = jnp.broadcast_to(encode(y)[:, None], (height, width, feats))
  pos_x = jnp.broadcast_to(encode(x)[None], (height, width, feats))
  return jnp.concatenate([pos_y, pos_x], axis=-1)


def group_norm(features: int, groups: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs) -> nnx.GroupNorm:
  """`nnx.GroupNorm` over conv channels as `torch.nn.GroupNorm` computes it."""
  if features % groups:
    raise ValueError(f"norm_groups={groups} must divide the channel count {features}")
  return nnx.GroupNorm(
      features, num_groups=groups, epsilon=NORM_EPS, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False, scale_metadata=layers.axes("conv_out"),
      bias_metadata=layers.axes("conv_out"), rngs=rngs)


class ConvNorm(nnx.Module):
  """Bias-free conv + GroupNorm (detectron2's `Conv2d(..., norm=GroupNorm)`)."""

  def __init__(self, in_dim: int, out_dim: int, kernel_size: int, groups: int, *, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    self.conv = layers.conv(in_dim, out_dim, kernel_size, use_bias=False, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.norm = group_norm(out_dim, groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class PixelDecoder(nnx.Module):
  """FPN over C2..C5 (MaskFormer's `BasePixelDecoder` with a lateral on every level).

  Top-down, as MaskFormer does: level i's output is
  relu(GN(conv3x3(lateral_i(C_i) + nearest_upsample(output_{i+1})))), the coarsest level having no
  upsampled term.
  """

  def __init__(self, in_dims: Sequence[int], cfg: ml_collections.ConfigDict, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if len(in_dims) != 4:
      raise ValueError(f"in_dims must hold 4 stage widths (C2..C5), got {tuple(in_dims)}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden, groups = cfg.hidden_dim, cfg.norm_groups
    self.lateral_convs = nnx.List([ConvNorm(d, hidden, 1, groups, **kw) for d in in_dims])
    self.output_convs = nnx.List([ConvNorm(hidden, hidden, 3, groups, **kw) for _ in in_dims])
    self.mask_features = layers.conv(hidden, cfg.mask_dim, 1, **kw)

  def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """features: C2..C5, [batch, h_i, w_i, in_dims[i]] at strides 4, 8, 16, 32.

    Returns (mask_features [batch, h_0, w_0, mask_dim], levels: 4 x [batch, h_i, w_i, hidden_dim]).
    """
    if len(features) != len(self.lateral_convs):
      raise ValueError(f"PixelDecoder expects 4 stage maps (C2..C5), got {len(features)}")
    levels = [None] * len(features)
    y = None
    for i in reversed(range(len(features))):
      x = self.lateral_convs[i](features[i])
      if y is not None:
        x = x + resize_nearest(y, x.shape[1:3])
      y = jax.nn.relu(self.output_convs[i](x))
      levels[i] = y
    return self.mask_features(levels[0]), levels


class MLP(nnx.Module):
  """Linear layers with ReLU between them (Mask2Former's `MLP`); kernels alternate embed/mlp."""

  def __init__(self, dims: Sequence[int], out_axis: str, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    # Axis names alternate so that no kernel names one logical axis twice.
    names = ["embed" if i % 2 == 0 else "mlp" for i in range(len(dims) - 1)] + [out_axis]
    if names[-2] == out_axis:
      raise ValueError(f"MLP of widths {tuple(dims)} would name its last kernel {out_axis!r} twice")
    self.layers = nnx.List([
        layers.linear(dims[i], dims[i + 1], (names[i], names[i + 1]), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        for i in range(len(dims) - 1)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class Attention(layers.AttentionProjections):
  """Multi-head attention projections (`nn.MultiheadAttention` with the in-projection split)."""

  def split_heads(self, x: jax.Array) -> jax.Array:
    """[batch, n, dim] -> [batch, heads, n, head_dim]."""
    b, n, d = x.shape
    return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

  def merge_heads(self, x: jax.Array) -> jax.Array:
    """[batch, heads, n, head_dim] -> out_proj of [batch, n, dim]."""
    b, h, n, d = x.shape
    return self.out_proj(x.transpose(0, 2, 1, 3).reshape(b, n, h * d))


class CrossAttentionLayer(nnx.Module):
  """Masked cross-attention of the queries to one level's pixels, + residual + LayerNorm."""

  def __init__(self, dim: int, num_heads: int, impl: str, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.impl = impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.multihead_attn = Attention(dim, num_heads, **kw)
    self.norm = layers.layer_norm(dim, "embed", epsilon=NORM_EPS, **kw)

  def __call__(self, queries: jax.Array, keys: jax.Array, values: jax.Array,
               mask_logits: jax.Array) -> jax.Array:
    """queries [b, q, dim]; keys/values [b, pixels, dim]; mask_logits [b, q, pixels]."""
    attn = self.multihead_attn
    out = fine_grained_cross_attention(
        attn.split_heads(attn.q_proj(queries)), attn.split_heads(attn.k_proj(keys)),
        attn.split_heads(attn.v_proj(values)), mask_logits, impl=self.impl)
    return self.norm(queries + attn.merge_heads(out))


class SelfAttentionLayer(nnx.Module):
  """Self-attention among the queries (invalid ones masked as keys), + residual + LayerNorm."""

  def __init__(self, dim: int, num_heads: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = Attention(dim, num_heads, **kw)
    self.norm = layers.layer_norm(dim, "embed", epsilon=NORM_EPS, **kw)

  def __call__(self, queries: jax.Array, query_valid: jax.Array) -> jax.Array:
    """queries [b, q, dim]; query_valid [b, q] bool (at least one True per row)."""
    attn = self.self_attn
    # jax.nn.dot_product_attention takes [batch, n, heads, head_dim].
    q, k, v = (attn.split_heads(p(queries)).transpose(0, 2, 1, 3)
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = jax.nn.dot_product_attention(q, k, v, mask=query_valid[:, None, None, :])
    return self.norm(queries + attn.merge_heads(out.transpose(0, 2, 1, 3)))


class FFNLayer(nnx.Module):
  """Linear -> ReLU -> Linear, + residual + LayerNorm."""

  def __init__(self, dim: int, ffn_dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear1 = layers.linear(dim, ffn_dim, ("embed", "mlp"), **kw)
    self.linear2 = layers.linear(ffn_dim, dim, ("mlp", "embed"), **kw)
    self.norm = layers.layer_norm(dim, "embed", epsilon=NORM_EPS, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(x + self.linear2(jax.nn.relu(self.linear1(x))))


class MaskDecoder(nnx.Module):
  """Pixel decoder + L masked-attention layers over queries from the LLM.

  Built from `config.model.mask_decoder`.

  Fields: hidden_dim, mask_dim, num_layers, num_heads, ffn_dim, feature_levels (FPN level per
  layer, cycled; 0 is stride 4), cross_attention_impl, use_region_queries, aux_loss, norm_groups.

  With `scan_layers` each kind of decoder layer is one stacked module
  (`transformer_ffn_layers/linear1/kernel` is `[num_layers, ...]`, leading axis `layers`) and the
  layers run as `jax.lax.scan` over rounds: one round is one layer per feature level (Mask2Former:
  3 rounds of 3 levels), so the memories' shapes are the same in every round; the layers of an
  incomplete last round (num_layers not a multiple of len(feature_levels)) run unrolled.
  """

  def __init__(self, llm_width: int, in_dims: Sequence[int], cfg: ml_collections.ConfigDict, *,
               dtype: Any = None, param_dtype: Any = jnp.float32, scan_layers: bool = False,
               rngs: nnx.Rngs):
    self.feature_levels = tuple(int(l) for l in cfg.feature_levels)
    if not self.feature_levels or any(not 0 <= l < len(in_dims) for l in self.feature_levels):
      raise ValueError(
          f"mask_decoder.feature_levels must index the {len(in_dims)} FPN levels, "
          f"got {cfg.feature_levels}")
    if cfg.cross_attention_impl not in IMPLEMENTATIONS:
      raise ValueError(f"mask_decoder.cross_attention_impl must be one of {IMPLEMENTATIONS}, "
                       f"got {cfg.cross_attention_impl!r}")
    if cfg.num_layers < 1:
      raise ValueError(f"mask_decoder.num_layers must be >= 1, got {cfg.num_layers}")
    self.scan_layers = scan_layers
    self.num_layers = cfg.num_layers
    self.use_region_queries = bool(cfg.use_region_queries)
    self.aux_loss = bool(cfg.aux_loss)
    self.hidden_dim = dim = cfg.hidden_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.pixel_decoder = PixelDecoder(in_dims, cfg, **kw)
    self.seg_proj = MLP((llm_width, dim, dim), "embed", **kw)
    if self.use_region_queries:
      self.region_proj = MLP((llm_width, dim, dim), "embed", **kw)
    self.level_embed = layers.param(
        rngs, nnx.initializers.normal(1.0), (len(self.feature_levels), dim), ("position", "embed"),
        param_dtype)
    stack = layers.stack_modules if scan_layers else nnx.List
    self.transformer_cross_attention_layers = stack([
        CrossAttentionLayer(dim, cfg.num_heads, cfg.cross_attention_impl, **kw)
        for _ in range(cfg.num_layers)])
    self.transformer_self_attention_layers = stack([
        SelfAttentionLayer(dim, cfg.num_heads, **kw) for _ in range(cfg.num_layers)])
    self.transformer_ffn_layers = stack([
        FFNLayer(dim, cfg.ffn_dim, **kw) for _ in range(cfg.num_layers)])
    self.decoder_norm = layers.layer_norm(dim, "embed", epsilon=NORM_EPS, **kw)
    self.mask_embed = MLP((dim, dim, dim, cfg.mask_dim), "conv_out", **kw)

  def level_of_layer(self, layer: int) -> int:
    """The FPN level (0 = stride 4) that decoder layer `layer` cross-attends to."""
    return self.feature_levels[layer % len(self.feature_levels)]

  def predict(self, queries: jax.Array, mask_features: jax.Array) -> jax.Array:
    """Mask logits [b, q, H/4, W/4] (float32) of queries [b, q, dim] on [b, H/4, W/4, mask_dim]."""
    embed = self.mask_embed(self.decoder_norm(queries))
    return jnp.einsum("bqc,bhwc->bqhw", embed, mask_features, preferred_element_type=jnp.float32)

  def __call__(
      self,
      features: Sequence[jax.Array],
      seg_states: jax.Array,
      region_states: jax.Array | None = None,
      region_valid: jax.Array | None = None,
  ) -> MaskDecoderOutput:
    """Decodes masks for the seg queries.

    Args:
      features: C2..C5 stage maps, [batch, h_i, w_i, in_dims[i]] at strides 4..32.
      seg_states: [batch, seg, llm_width] LLM hidden states of the [SEG] tokens.
      region_states: [batch, regions, llm_width] LLM states of the object/part tokens, used as
        extra queries when `use_region_queries`; ignored otherwise.
      region_valid: [batch, regions] bool; invalid regions never act as self-attention keys, so
        they do not affect the seg queries. None means all valid.

    Returns:
      MaskDecoderOutput (see there).
    """
    mask_features, levels = self.pixel_decoder(features)
    mask_features = sharding.constrain(mask_features, "activation_batch", None, None,
                                     "activation_embed")
    batch, num_seg = seg_states.shape[:2]

    queries = self.seg_proj(seg_states)
    query_valid = jnp.ones((batch, num_seg), bool)
    if self.use_region_queries and region_states is not None:
      queries = jnp.concatenate([queries, self.region_proj(region_states)], axis=1)
      if region_valid is None:
        region_valid = jnp.ones(region_states.shape[:2], bool)
      query_valid = jnp.concatenate([query_valid, region_valid.astype(bool)], axis=1)

    # Keys carry level embedding + position; values only the level embedding (as Mask2Former).
    memories = []
    for i, level in enumerate(self.feature_levels):
      src = levels[level]
      h, w = src.shape[1:3]
      value = (src + self.level_embed[i].astype(src.dtype)).reshape(batch, h * w, -1)
      value = sharding.constrain(value, "activation_batch", "activation_length", "activation_embed")
      pos = sine_position_encoding(h, w, self.hidden_dim).reshape(h * w, -1)
      memories.append((value + pos.astype(value.dtype), value, (h, w)))

    first = self.predict(queries, mask_features)
    run = self._scanned_layers if self.scan_layers else self._unrolled_layers
    queries, predictions = run(queries, first, memories, query_valid, mask_features)

    seg = [p[:, :num_seg] for p in [first, *predictions]]
    return MaskDecoderOutput(
        mask_logits=seg[-1],
        aux_mask_logits=seg[:-1] if self.aux_loss else [],
        seg_queries=queries[:, :num_seg])

  def _layer(self, cross: CrossAttentionLayer, self_attn: SelfAttentionLayer, ffn: FFNLayer,
             queries: jax.Array, prediction: jax.Array, memory: tuple[jax.Array, jax.Array, Any],
             query_valid: jax.Array, mask_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decoder layer: queries [b, q, dim] under the previous prediction [b, q, H/4, W/4],
    attending to memory (keys, values [b, pixels, dim], (h, w)) -> (queries, its prediction)."""
    keys, values, size = memory
    # The attention mask is a decision, not a path for gradients.
    attn_logits = jax.lax.stop_gradient(resize_mask_logits(prediction, size))
    queries = cross(queries, keys, values, attn_logits.reshape(*queries.shape[:2], -1))
    queries = ffn(self_attn(queries, query_valid))
    return queries, self.predict(queries, mask_features)

  def _unrolled_layers(self, queries, first, memories, query_valid, mask_features):
    """The layers one after another -> (final queries, the num_layers predictions)."""
    predictions = [first]
    for l in range(self.num_layers):
      queries, prediction = self._layer(
          self.transformer_cross_attention_layers[l], self.transformer_self_attention_layers[l],
          self.transformer_ffn_layers[l], queries, predictions[-1],
          memories[l % len(self.feature_levels)], query_valid, mask_features)
      predictions.append(prediction)
    return queries, predictions[1:]

  def _scanned_layers(self, queries, first, memories, query_valid, mask_features):
    """The stacked layers as a scan over rounds, each round one layer per feature level
    (unrolled in the scan body: the levels' memories differ in shape), then the layers of an
    incomplete last round unrolled -> as `_unrolled_layers`."""
    levels = len(self.feature_levels)
    graphdefs, states = zip(*(nnx.split(s) for s in (
        self.transformer_cross_attention_layers, self.transformer_self_attention_layers,
        self.transformer_ffn_layers)))

    def layer(states, index):  # (cross, self, ffn) of one layer of stacks `states`
      return (layers.unstacked(g, jax.tree_util.tree_map(lambda x: x[index], s))
              for g, s in zip(graphdefs, states))

    def body(carry, round_states):
      queries, prediction = carry
      predictions = []
      for j in range(levels):
        queries, prediction = self._layer(*layer(round_states, j), queries, prediction,
                                          memories[j], query_valid, mask_features)
        predictions.append(prediction)
      return (queries, prediction), jnp.stack(predictions)

    # [num_layers, ...] -> [rounds, levels, ...]: layer l is round l // levels, level l % levels.
    scanned = self.num_layers // levels * levels
    prediction, predictions = first, []
    if scanned:
      rounds = jax.tree_util.tree_map(
          lambda x: x[:scanned].reshape(-1, levels, *x.shape[1:]), states)
      (queries, prediction), stacked = jax.lax.scan(body, (queries, first), rounds)
      # [rounds, levels, b, q, H/4, W/4] -> the predictions in layer order.
      predictions = list(stacked.reshape(-1, *stacked.shape[2:]))
    for l in range(scanned, self.num_layers):
      queries, prediction = self._layer(*layer(states, l), queries, prediction,
                                        memories[l % levels], query_valid, mask_features)
      predictions.append(prediction)
    return queries, predictions
