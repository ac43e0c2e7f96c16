"""The mask decoder in PyTorch: `unires_jax.models.mask_decoder`, attribute names as in Flax.

An FPN pixel decoder, then Mask2Former-style layers in which the queries (the LLM's [SEG] state
and, with `use_region_queries`, its object/part states) cross-attend to one FPN level under the
previous layer's predicted mask, self-attend and pass an FFN, each followed by residual +
LayerNorm. Feature maps are channels-first here, `[batch, channels, height, width]`.
"""

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-5


class MaskDecoderOutput(NamedTuple):
  """mask_logits `[batch, seg, H/4, W/4]`; aux_mask_logits: the earlier predictions (initial
  queries, then layers 0..L-2), same shape, empty without `aux_loss`; seg_queries
  `[batch, seg, hidden_dim]`."""

  mask_logits: torch.Tensor
  aux_mask_logits: list[torch.Tensor]
  seg_queries: torch.Tensor


def sine_position_encoding(height: int, width: int, dim: int) -> torch.Tensor:
  """Mask2Former's `PositionEmbeddingSine(dim // 2, normalize=True)` -> `[height * width, dim]`.

  Channels: dim/2 for y, then dim/2 for x; within each, sin and cos interleaved per frequency.
  """
  if dim % 4:
    raise ValueError(f"hidden_dim must be a multiple of 4 for sine position encodings, got {dim}")
  feats = dim // 2
  eps, scale = 1e-6, 2 * math.pi
  y = (torch.arange(1, height + 1, dtype=torch.float32) - 0.5) / (height + eps) * scale
  x = (torch.arange(1, width + 1, dtype=torch.float32) - 0.5) / (width + eps) * scale
  dim_t = 10000.0 ** (2 * (torch.arange(feats) // 2) / feats)

  def encode(coord):  # [n] -> [n, feats]
    angles = coord[:, None] / dim_t
    return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], -1).reshape(-1, feats)

  pos_y = encode(y)[:, None].expand(height, width, feats)
  pos_x = encode(x)[None].expand(height, width, feats)
  return torch.cat([pos_y, pos_x], dim=-1).reshape(height * width, dim)


class ConvNorm(nn.Module):
  """Bias-free conv + GroupNorm."""

  def __init__(self, in_dim: int, out_dim: int, kernel_size: int, groups: int):
    super().__init__()
    self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False)
    self.norm = nn.GroupNorm(groups, out_dim, eps=NORM_EPS)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.norm(self.conv(x))


class PixelDecoder(nn.Module):
  """FPN over C2..C5: level i is relu(GN(conv3x3(lateral_i(C_i) + nearest_up(level i+1))))."""

  def __init__(self, in_dims: Sequence[int], hidden_dim: int, mask_dim: int, norm_groups: int):
    super().__init__()
    self.lateral_convs = nn.ModuleList(
        [ConvNorm(d, hidden_dim, 1, norm_groups) for d in in_dims])
    self.output_convs = nn.ModuleList(
        [ConvNorm(hidden_dim, hidden_dim, 3, norm_groups) for _ in in_dims])
    self.mask_features = nn.Conv2d(hidden_dim, mask_dim, 1)

  def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """C2..C5 `[batch, in_dims[i], h_i, w_i]` -> (mask_features `[batch, mask_dim, h_0, w_0]`,
    levels: 4 x `[batch, hidden_dim, h_i, w_i]`)."""
    levels = [None] * len(features)
    y = None
    for i in reversed(range(len(features))):
      x = self.lateral_convs[i](features[i])
      if y is not None:
        x = x + F.interpolate(y, size=x.shape[2:], mode="nearest")
      y = levels[i] = F.relu(self.output_convs[i](x))
    return self.mask_features(levels[0]), levels


class MLP(nn.Module):
  """Linear layers with ReLU between them."""

  def __init__(self, dims: Sequence[int]):
    super().__init__()
    self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in itertools.pairwise(dims)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = F.relu(x)
    return x


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v projections, under a boolean mask."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    if dim % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide hidden_dim={dim}")
    self.num_heads = num_heads
    self.q_proj = nn.Linear(dim, dim)
    self.k_proj = nn.Linear(dim, dim)
    self.v_proj = nn.Linear(dim, dim)
    self.out_proj = nn.Linear(dim, dim)

  def _split(self, x: torch.Tensor) -> torch.Tensor:
    """`[batch, n, dim]` -> `[batch, heads, n, head_dim]`."""
    return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

  def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              allowed: torch.Tensor) -> torch.Tensor:
    """queries `[b, q, dim]`, keys/values `[b, k, dim]`, allowed `[b, q, k]` bool (at least one
    True per row) -> `[b, q, dim]`."""
    out = F.scaled_dot_product_attention(
        self._split(self.q_proj(queries)), self._split(self.k_proj(keys)),
        self._split(self.v_proj(values)), attn_mask=allowed[:, None])
    return self.out_proj(out.transpose(1, 2).flatten(2))


def allowed_keys(mask_logits: torch.Tensor) -> torch.Tensor:
  """Mask2Former's rule, as `unires_jax.kernels.cross_attention_ref.allowed_keys` without padded
  keys: `[b, q, k]` logits -> bool, logit >= 0, or every key for a query with none."""
  allowed = mask_logits >= 0
  return allowed | ~allowed.any(dim=-1, keepdim=True)


class CrossAttentionLayer(nn.Module):
  """Masked cross-attention of the queries to one level's pixels, + residual + LayerNorm."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.multihead_attn = Attention(dim, num_heads)
    self.norm = nn.LayerNorm(dim, eps=NORM_EPS)

  def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              mask_logits: torch.Tensor) -> torch.Tensor:
    """queries `[b, q, dim]`; keys/values `[b, pixels, dim]`; mask_logits `[b, q, pixels]`."""
    attended = self.multihead_attn(queries, keys, values, allowed_keys(mask_logits))
    return self.norm(queries + attended)


class SelfAttentionLayer(nn.Module):
  """Self-attention among the queries (invalid ones masked as keys), + residual + LayerNorm."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.self_attn = Attention(dim, num_heads)
    self.norm = nn.LayerNorm(dim, eps=NORM_EPS)

  def forward(self, queries: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """queries `[b, q, dim]`; query_valid `[b, q]` bool (at least one True per row)."""
    allowed = query_valid[:, None, :].expand(-1, queries.shape[1], -1)
    return self.norm(queries + self.self_attn(queries, queries, queries, allowed))


class FFNLayer(nn.Module):
  """Linear -> ReLU -> Linear, + residual + LayerNorm."""

  def __init__(self, dim: int, ffn_dim: int):
    super().__init__()
    self.linear1 = nn.Linear(dim, ffn_dim)
    self.linear2 = nn.Linear(ffn_dim, dim)
    self.norm = nn.LayerNorm(dim, eps=NORM_EPS)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class MaskDecoder(nn.Module):
  """Pixel decoder + masked-attention layers over queries from the LLM (`config.mask_decoder`).

  Every `cross_attention_impl` of the JAX model computes `cross_attention_ref`'s rule, which
  this module follows.
  """

  def __init__(self, llm_width: int, in_dims: Sequence[int], cfg: Mapping):
    super().__init__()
    self.feature_levels = tuple(int(l) for l in cfg["feature_levels"])
    if not self.feature_levels or any(not 0 <= l < len(in_dims) for l in self.feature_levels):
      raise ValueError(f"mask_decoder.feature_levels must index the {len(in_dims)} FPN levels, "
                       f"got {cfg['feature_levels']}")
    self.use_region_queries = bool(cfg["use_region_queries"])
    self.aux_loss = bool(cfg["aux_loss"])
    self.hidden_dim = dim = cfg["hidden_dim"]
    num_layers, num_heads = cfg["num_layers"], cfg["num_heads"]
    self.pixel_decoder = PixelDecoder(in_dims, dim, cfg["mask_dim"], cfg["norm_groups"])
    self.seg_proj = MLP((llm_width, dim, dim))
    if self.use_region_queries:
      self.region_proj = MLP((llm_width, dim, dim))
    self.level_embed = nn.Parameter(torch.zeros(len(self.feature_levels), dim))
    self.transformer_cross_attention_layers = nn.ModuleList(
        [CrossAttentionLayer(dim, num_heads) for _ in range(num_layers)])
    self.transformer_self_attention_layers = nn.ModuleList(
        [SelfAttentionLayer(dim, num_heads) for _ in range(num_layers)])
    self.transformer_ffn_layers = nn.ModuleList(
        [FFNLayer(dim, cfg["ffn_dim"]) for _ in range(num_layers)])
    self.decoder_norm = nn.LayerNorm(dim, eps=NORM_EPS)
    self.mask_embed = MLP((dim, dim, dim, cfg["mask_dim"]))

  def predict(self, queries: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
    """Mask logits `[b, q, H/4, W/4]` of queries `[b, q, dim]` on `[b, mask_dim, H/4, W/4]`."""
    embed = self.mask_embed(self.decoder_norm(queries))
    return torch.einsum("bqc,bchw->bqhw", embed, mask_features)

  def forward(self, features: Sequence[torch.Tensor], seg_states: torch.Tensor,
              region_states: torch.Tensor, region_valid: torch.Tensor) -> MaskDecoderOutput:
    """Decodes masks for the seg queries.

    Args:
      features: C2..C5 stage maps, `[batch, in_dims[i], h_i, w_i]` at strides 4..32.
      seg_states: `[batch, seg, llm_width]` LLM hidden states of the [SEG] tokens.
      region_states: `[batch, regions, llm_width]` LLM states of the object/part tokens, extra
        queries when `use_region_queries`.
      region_valid: `[batch, regions]` bool; invalid regions are never self-attention keys.
    """
    mask_features, levels = self.pixel_decoder(features)
    batch, num_seg = seg_states.shape[:2]
    queries = self.seg_proj(seg_states)
    query_valid = torch.ones(batch, num_seg, dtype=torch.bool, device=queries.device)
    if self.use_region_queries:
      queries = torch.cat([queries, self.region_proj(region_states)], dim=1)
      query_valid = torch.cat([query_valid, region_valid.bool()], dim=1)

    # Keys carry level embedding + position; values only the level embedding (as Mask2Former).
    memories = []
    for i, level in enumerate(self.feature_levels):
      src = levels[level]
      value = src.flatten(2).transpose(1, 2) + self.level_embed[i]
      pos = sine_position_encoding(*src.shape[2:], self.hidden_dim).to(value)
      memories.append((value + pos, value, src.shape[2:]))

    predictions = [self.predict(queries, mask_features)]
    for l, (cross, self_attn, ffn) in enumerate(zip(
        self.transformer_cross_attention_layers, self.transformer_self_attention_layers,
        self.transformer_ffn_layers)):
      keys, values, size = memories[l % len(memories)]
      attn_logits = F.interpolate(predictions[-1], size=size, mode="bilinear", align_corners=False)
      queries = cross(queries, keys, values, attn_logits.flatten(2))
      queries = ffn(self_attn(queries, query_valid))
      predictions.append(self.predict(queries, mask_features))

    seg = [p[:, :num_seg] for p in predictions]
    return MaskDecoderOutput(mask_logits=seg[-1], aux_mask_logits=seg[:-1] if self.aux_loss else [],
                             seg_queries=queries[:, :num_seg])
