"""OWLv2, the open-vocabulary detector that proposes UniRES++'s object and part boxes, as
`transformers.Owlv2ForObjectDetection` computes it.

A CLIP image tower (`clip_vit.CLIPVisionTransformer`) turns every patch into an image embedding
(the last layer, post-LN, times the post-LN CLS token, LN again); a CLIP text tower (causal, pooled
at the end-of-text token) embeds the text queries. Three heads read each patch embedding: the
class head (cosine similarity to each query with a learned per-patch shift and scale), the box
head (cx, cy, w, h through a sigmoid, biased towards the patch's own cell of the grid) and the
objectness head. The parameter tree mirrors transformers' (without its `owlv2.` level and with
CLIP's `pre_layrnorm` spelling in the image tower), so that `unires_jax.convert.owlv2` is a table
of name rules. Images are channels-last.
"""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unires_jax.models import clip_vit
from unires_jax.models import layers

# transformers' CLIP-BPE vocabulary and query length, shared by every released OWLv2.
VOCAB_SIZE = 49408
MAX_QUERY_TOKENS = 16


def _config(*, image_size: int, patch_size: int, vision_width: int, vision_layers: int,
            vision_heads: int, text_width: int, text_layers: int, text_heads: int,
            projection_dim: int, vocab_size: int = VOCAB_SIZE,
            max_position_embeddings: int = MAX_QUERY_TOKENS) -> ml_collections.ConfigDict:
  tower = lambda width, num_layers, num_heads: dict(
      hidden_size=width, intermediate_size=4 * width, num_layers=num_layers, num_heads=num_heads,
      layer_norm_eps=1e-5, hidden_act="quick_gelu")
  return ml_collections.ConfigDict(dict(
      vision=dict(image_size=image_size, patch_size=patch_size, num_channels=3,
                  **tower(vision_width, vision_layers, vision_heads)),
      text=dict(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                **tower(text_width, text_layers, text_heads)),
      projection_dim=projection_dim,
  ))


def base_patch16() -> ml_collections.ConfigDict:
  """google/owlv2-base-patch16(-ensemble): ViT-B/16 at 960 x 960 (60 x 60 patches), 155.0M
  parameters."""
  return _config(image_size=960, patch_size=16, vision_width=768, vision_layers=12,
                 vision_heads=12, text_width=512, text_layers=12, text_heads=8,
                 projection_dim=512)


def large_patch14() -> ml_collections.ConfigDict:
  """google/owlv2-large-patch14(-ensemble): ViT-L/14 at 1008 x 1008 (72 x 72 patches), 437.6M
  parameters."""
  return _config(image_size=1008, patch_size=14, vision_width=1024, vision_layers=24,
                 vision_heads=16, text_width=768, text_layers=12, text_heads=12,
                 projection_dim=768)


def tiny() -> ml_collections.ConfigDict:
  """A 56k-parameter OWLv2 for tests and CPU demos (32 x 32 images, 4 x 4 patches)."""
  return _config(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                 text_width=24, text_layers=2, text_heads=2, projection_dim=24, vocab_size=100,
                 max_position_embeddings=8)


def box_bias(grid: tuple[int, int]) -> np.ndarray:
  """[rows * cols, 4] logits that put each patch's box on its own cell, as transformers'
  `compute_box_bias`: inverse sigmoid of the cell's bottom-right corner (cx, cy) and of the cell
  size (w, h), float32."""
  rows, cols = grid
  xx, yy = np.meshgrid(np.arange(1, cols + 1, dtype=np.float32) / np.float32(cols),
                       np.arange(1, rows + 1, dtype=np.float32) / np.float32(rows))
  corners = np.clip(np.stack([xx, yy], -1).reshape(-1, 2), 0.0, 1.0)
  sizes = np.broadcast_to(np.array([1 / cols, 1 / rows], np.float32), corners.shape)
  logit = lambda p: np.log(p + np.float32(1e-4)) - np.log1p(-p + np.float32(1e-4))
  return np.concatenate([logit(corners), logit(sizes)], -1).astype(np.float32)


def _unit(x: jax.Array, eps: float = 0.0) -> jax.Array:
  """x / (||x||_2 + eps) over the last axis."""
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


class Owlv2TextEmbeddings(nnx.Module):
  """Token and learned position embeddings of the query tower."""

  def __init__(self, cfg, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)  # as transformers' _init_weights
    self.token_embedding = layers.param(
        rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
    self.position_embedding = layers.param(
        rngs, init, (cfg.max_position_embeddings, cfg.hidden_size), ("position", "embed"),
        param_dtype)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """[n, tokens] int -> [n, tokens, width]."""
    tokens = input_ids.shape[-1]
    if tokens > self.position_embedding.shape[0]:
      raise ValueError(f"queries of {tokens} tokens exceed the config's max_position_embeddings "
                       f"{self.position_embedding.shape[0]}")
    table = self.token_embedding[...]
    return jnp.take(table, input_ids, axis=0) + self.position_embedding[:tokens].astype(table.dtype)


class Owlv2TextTransformer(nnx.Module):
  """CLIP's text tower: causal pre-norm transformer, final LN, pooled at the end-of-text token.

  Fields of `cfg` (`config.text`): vocab_size, max_position_embeddings, hidden_size,
  intermediate_size, num_layers, num_heads, layer_norm_eps, hidden_act.
  """

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, remat: str = "none",
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = Owlv2TextEmbeddings(cfg, param_dtype=param_dtype, rngs=rngs)
    self.encoder = clip_vit.CLIPEncoder(cfg, remat=remat, **kw)
    self.final_layer_norm = layers.layer_norm(cfg.hidden_size, "embed",
                                              epsilon=cfg.layer_norm_eps, **kw)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes queries.

    Args:
      input_ids: [n, tokens] int, CLIP-BPE ids (start token, text, end token, padding).
      attention_mask: [n, tokens], 1 for real tokens and 0 for padding; None: all real.

    Returns:
      last_hidden_state [n, tokens, width] (after the final LN), and pooled [n, width]: the state
      at the first position of the largest token id, the end-of-text token in CLIP's vocabulary
      (transformers 5 pools there: `input_ids.argmax(-1)`).
    """
    tokens = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((tokens, tokens), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    hidden = self.encoder(self.embeddings(input_ids), mask)[-1]
    hidden = self.final_layer_norm(hidden)
    eot = jnp.argmax(input_ids, axis=-1)
    return hidden, jnp.take_along_axis(hidden, eot[:, None, None], axis=1)[:, 0]


class Owlv2BoxPredictionHead(nnx.Module):
  """Per-patch MLP: dense0 -> GELU -> dense1 -> GELU -> dense2 (`out_dim` outputs)."""

  def __init__(self, width: int, out_dim: int, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dense0 = layers.linear(width, width, ("embed", "mlp"), **kw)
    self.dense1 = layers.linear(width, width, ("mlp", "embed"), **kw)
    self.dense2 = layers.linear(width, out_dim, ("embed", None), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., width] -> [..., out_dim]."""
    return self.dense2(layers.gelu_exact(self.dense1(layers.gelu_exact(self.dense0(x)))))


class Owlv2ClassPredictionHead(nnx.Module):
  """Per-patch class embeddings and their logits against the query embeddings."""

  def __init__(self, vision_width: int, text_width: int, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dense0 = layers.linear(vision_width, text_width, ("embed", "mlp"), **kw)
    self.logit_shift = layers.linear(vision_width, 1, ("embed", None), **kw)
    self.logit_scale = layers.linear(vision_width, 1, ("embed", None), **kw)

  def __call__(self, image_embeds: jax.Array, query_embeds: jax.Array,
               query_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scores every patch against every query.

    Args:
      image_embeds: [batch, patches, vision_width].
      query_embeds: [batch, queries, text_width].
      query_mask: [batch, queries] bool, False for padding queries.

    Returns:
      logits [batch, patches, queries] float32: (cos(class_embed, query) + shift) * scale, with
      scale = ELU(.) + 1 > 0, both per patch; padding queries get float32's lowest value. And
      class_embeds [batch, patches, text_width], unit length.
    """
    class_embeds = _unit(self.dense0(image_embeds), 1e-6)
    logits = jnp.einsum("bpd,bqd->bpq", class_embeds, _unit(query_embeds, 1e-6))
    scale = jax.nn.elu(self.logit_scale(image_embeds)) + 1
    logits = ((logits + self.logit_shift(image_embeds)) * scale).astype(jnp.float32)
    logits = jnp.where(query_mask[:, None, :], logits, jnp.finfo(jnp.float32).min)
    return logits, class_embeds


class Owlv2ForObjectDetection(nnx.Module):
  """OWLv2 detector built from an `owlv2` config (`base_patch16()`, `large_patch14()`, `tiny()`).

  Config fields:
    vision: image_size, patch_size, num_channels, hidden_size, intermediate_size, num_layers,
      num_heads, layer_norm_eps, hidden_act (a CLIP ViT; `clip_vit.CLIPVisionTransformer`).
    text: vocab_size, max_position_embeddings, hidden_size, intermediate_size, num_layers,
      num_heads, layer_norm_eps, hidden_act.
    projection_dim: width of the joint image-text embedding (`text_embeds`); the class head
      compares it with class embeddings of text.hidden_size, so the two must be equal.
  """

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, remat: str = "none",
               rngs: nnx.Rngs):
    if cfg.projection_dim != cfg.text.hidden_size:
      raise ValueError(f"projection_dim {cfg.projection_dim} must equal text.hidden_size "
                       f"{cfg.text.hidden_size}: the class head compares query embeddings with "
                       "class embeddings of the text width")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    vision = ml_collections.ConfigDict(cfg.vision.to_dict())
    # The tower's `features` are then the whole last layer, CLS first: what the heads read.
    vision.update(select_layer=-1, select_feature="cls_patch", interpolate_pos_encoding=False)
    vw, tw = cfg.vision.hidden_size, cfg.text.hidden_size
    self.patch_size = cfg.vision.patch_size
    self.vision_model = clip_vit.CLIPVisionTransformer(vision, remat=remat, **kw)
    self.text_model = Owlv2TextTransformer(cfg.text, remat=remat, **kw)
    self.visual_projection = layers.linear(vw, cfg.projection_dim, ("embed", "mlp"),
                                           use_bias=False, **kw)
    self.text_projection = layers.linear(tw, cfg.projection_dim, ("embed", "mlp"),
                                         use_bias=False, **kw)
    # CLIP's temperature (log scale), used only by the image-level `logits_per_image`.
    self.logit_scale = layers.param(rngs, nnx.initializers.constant(2.6592), (), (), param_dtype)
    self.class_head = Owlv2ClassPredictionHead(vw, tw, **kw)
    self.box_head = Owlv2BoxPredictionHead(vw, 4, **kw)
    self.objectness_head = Owlv2BoxPredictionHead(vw, 1, **kw)
    self.layer_norm = layers.layer_norm(vw, "embed", epsilon=cfg.vision.layer_norm_eps, **kw)

  def embed_queries(self, input_ids: jax.Array,
                    attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """[n, tokens] text queries -> (unit query embeddings [n, projection_dim], text-tower
    pooled states [n, text_width])."""
    _, pooled = self.text_model(input_ids, attention_mask)
    return _unit(self.text_projection(pooled)), pooled

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None, *,
               interpolate_pos_encoding: bool = False) -> dict[str, jax.Array]:
    """Detects the queries in the images.

    Args:
      pixel_values: [batch, height, width, channels], as `detection.owlv2_preprocess` makes them.
      input_ids: [batch, queries, tokens] int, the queries of each image (a query whose first id
        is 0 is padding: its logits are float32's lowest value, as transformers').
      attention_mask: [batch, queries, tokens] (1 real, 0 padding token) or None.
      interpolate_pos_encoding: allow a size other than the config's image_size (bicubic
        position embeddings and the box bias of the actual patch grid, as transformers).

    Returns:
      logits: [batch, patches, queries] per-patch class logits (patches row-major).
      objectness_logits: [batch, patches].
      pred_boxes: [batch, patches, 4] (cx, cy, w, h) in [0, 1] of the (square) input image.
      image_embeds: [batch, rows, cols, vision_width], the patch embeddings the heads read.
      class_embeds: [batch, patches, text_width], unit-length patch class embeddings.
      text_embeds: [batch, queries, projection_dim], unit-length query embeddings.
      logits_per_image: [batch, batch * queries], CLIP's image-level similarity of each image to
        every query of the batch (transformers' `Owlv2Model` output).
    """
    batch, height, width = pixel_values.shape[:3]
    grid = (height // self.patch_size, width // self.patch_size)
    vision = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    tokens = self.vision_model.post_layernorm(vision.features)
    image_embeds = self.layer_norm(tokens[:, 1:] * tokens[:, :1])  # [batch, patches, width]

    num_queries, num_tokens = input_ids.shape[1:]
    flat_mask = None if attention_mask is None else attention_mask.reshape(-1, num_tokens)
    text_embeds, _ = self.embed_queries(input_ids.reshape(-1, num_tokens), flat_mask)
    query_embeds = text_embeds.reshape(batch, num_queries, -1)
    logits, class_embeds = self.class_head(image_embeds, query_embeds, input_ids[..., 0] > 0)

    # As transformers' `detach`: objectness trains only its own head.
    objectness = self.objectness_head(jax.lax.stop_gradient(image_embeds))[..., 0]
    bias = jnp.asarray(box_bias(grid), image_embeds.dtype)
    pred_boxes = jax.nn.sigmoid(self.box_head(image_embeds) + bias)

    image_level = _unit(self.visual_projection(vision.pooled))
    scale = jnp.exp(self.logit_scale[...])
    return {
        "logits": logits,
        "objectness_logits": objectness,
        "pred_boxes": pred_boxes,
        "image_embeds": image_embeds.reshape(batch, *grid, -1),
        "class_embeds": class_embeds,
        "text_embeds": query_embeds,
        "logits_per_image": image_level @ text_embeds.T * scale,
    }
