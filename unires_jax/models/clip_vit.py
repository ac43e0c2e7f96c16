"""CLIP ViT vision tower (UniRES++'s low-resolution encoder E_l), as `transformers` computes it.

The parameter tree mirrors `transformers.CLIPVisionModel` (`embeddings`, `pre_layrnorm`,
`encoder/layers/i/{self_attn,mlp,layer_norm1,layer_norm2}`, `post_layernorm`), so that
`unires_jax.convert.clip_vit` is a table of name rules. Images are channels-last.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unires_jax import sharding
from unires_jax.models import layers

SELECT_FEATURES = ("patch", "cls_patch")

# PyTorch's bicubic kernel: cubic convolution with A = -0.75 (OpenCV's choice, not Keys' -0.5
# that jax.image.resize uses).
_CUBIC_A = -0.75


class CLIPVisionOutput(NamedTuple):
  """What the tower returns.

  last_hidden_state: [batch, 1 + patches, width], the last layer's output (CLS first).
  pooled: [batch, width], post_layernorm of the last layer's CLS token.
  hidden_states: num_layers + 1 arrays [batch, 1 + patches, width]: the pre-LN embeddings, then
    every layer's output (transformers' `output_hidden_states=True`).
  features: [batch, patches (or 1 + patches), width], `hidden_states[select_layer]` without
    (or with) CLS, per `select_feature`: the image tokens UniRES++ gives the LLM.
  """

  last_hidden_state: jax.Array
  pooled: jax.Array
  hidden_states: tuple[jax.Array, ...]
  features: jax.Array


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """[n] fractional offsets -> [n, 4] weights of the taps at offsets -1, 0, 1, 2."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix M with M @ x == torch bicubic interpolation of x along one axis.

  Matches `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` given `size`
  (no antialias): source coordinate (i + 0.5) * in / out - 0.5, taps clamped to the border.
  """
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  left = np.floor(src)
  weights = _cubic_weights(src - left)
  taps = np.clip(left[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size)[:, None], taps), weights)
  return matrix


def resize_position_grid(table: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Bicubically resizes a square grid of position embeddings, as torch does.

  Args:
    table: [side * side, width], row-major grid of patch position embeddings.
    grid: (rows, cols) of the new grid.

  Returns:
    [rows * cols, width].
  """
  side = int(round(table.shape[0] ** 0.5))
  if side * side != table.shape[0]:
    raise ValueError(f"position table of {table.shape[0]} patch rows is not a square grid")
  rows = jnp.asarray(bicubic_resize_matrix(side, grid[0]), table.dtype)
  cols = jnp.asarray(bicubic_resize_matrix(side, grid[1]), table.dtype)
  square = table.reshape(side, side, -1)
  resized = jnp.einsum("ip,pqc,jq->ijc", rows, square, cols, precision=jax.lax.Precision.HIGHEST)
  return resized.reshape(grid[0] * grid[1], -1)


class CLIPVisionEmbeddings(nnx.Module):
  """Patch embedding (conv, no bias), class token and learned position embeddings."""

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    width = cfg.hidden_size
    self.image_size = cfg.image_size
    self.grid_side = cfg.image_size // cfg.patch_size
    # Initialisers as transformers' CLIPPreTrainedModel._init_weights.
    self.class_embedding = layers.param(
        rngs, nnx.initializers.normal(width**-0.5), (width,), ("embed",), param_dtype
    )
    self.patch_embedding = layers.conv(
        cfg.num_channels,
        width,
        cfg.patch_size,
        strides=cfg.patch_size,
        padding="VALID",
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.position_embedding = layers.param(
        rngs,
        nnx.initializers.normal(0.02),
        (self.grid_side**2 + 1, width),
        ("position", "embed"),
        param_dtype,
    )

  def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool) -> jax.Array:
    """[batch, height, width, channels] -> [batch, 1 + patches, width]."""
    batch, height, width = pixel_values.shape[:3]
    if not interpolate_pos_encoding and (height, width) != (self.image_size, self.image_size):
      raise ValueError(
          f"input image size {height}x{width} differs from the config's image_size "
          f"{self.image_size}; pass interpolate_pos_encoding=True (or set it in the config) to "
          "interpolate the position embeddings"
      )
    patches = self.patch_embedding(pixel_values)
    grid = patches.shape[1:3]
    patches = patches.reshape(batch, grid[0] * grid[1], -1)
    cls = self.class_embedding[...].astype(patches.dtype)
    cls = jnp.broadcast_to(cls, (batch, 1, patches.shape[-1]))
    positions = self.position_embedding[...]
    # At the config's grid the resize is the identity, so skipping it matches transformers.
    if grid != (self.grid_side, self.grid_side):
      positions = jnp.concatenate([positions[:1], resize_position_grid(positions[1:], grid)])
    return jnp.concatenate([cls, patches], axis=1) + positions.astype(patches.dtype)


class CLIPAttention(layers.AttentionProjections):
  """Multi-head self-attention with separate q/k/v/out projections: bidirectional, or under a
  mask (CLIP's text tower: causal and padding)."""

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(cfg.hidden_size, cfg.num_heads, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """[batch, tokens, width] -> [batch, tokens, width].

    mask: None (every token attends to every token), or bool [batch, 1, tokens, tokens], True
      where query token i may attend to key token j.
    """
    split = lambda y: y.reshape(*y.shape[:-1], self.num_heads, -1)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return self.out_proj(out.reshape(x.shape[:-1] + (-1,)))


class CLIPMLP(nnx.Module):
  """fc1 -> activation (quick-GELU for CLIP) -> fc2."""

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = layers.activation(cfg.hidden_act)
    self.fc1 = layers.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.fc2 = layers.linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = CLIPAttention(cfg, **kw)
    self.layer_norm1 = layers.layer_norm(cfg.hidden_size, "embed", epsilon=cfg.layer_norm_eps, **kw)
    self.mlp = CLIPMLP(cfg, **kw)
    self.layer_norm2 = layers.layer_norm(cfg.hidden_size, "embed", epsilon=cfg.layer_norm_eps, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    x = x + self.mlp(self.layer_norm2(x))
    return sharding.constrain(x, "activation_batch", "activation_length", "activation_embed")


def _call_layer(layer, x, mask):
  return layer(x, mask)


def _scan_body(layer, x, mask):
  """One scanned layer: `[batch, tokens, width]` -> its output, as the carry and as `y`."""
  x = layer(x, mask)
  return x, x


class CLIPEncoder(nnx.Module):
  """The stack of encoder layers (its own module so parameter paths read `encoder/layers/i`).

  With `scan_layers` the layers are one stacked `CLIPEncoderLayer` (`encoder/layers/mlp/fc1/
  kernel` is `[num_layers, ...]`, leading axis `layers`) applied with `jax.lax.scan`; every
  layer's output comes back as a scan output. Unrolled, XLA drops the layers whose outputs
  nothing reads (those after `select_layer`); scanned, every layer runs.
  """

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, remat: str = "none",
               scan_layers: bool = False, rngs: nnx.Rngs):
    self.remat = remat  # rematerialises each layer in the backward pass
    self.scan_layers = scan_layers
    self.num_layers = cfg.num_layers
    encoder = [CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
               for _ in range(cfg.num_layers)]
    self.layers = layers.stack_modules(encoder) if scan_layers else nnx.List(encoder)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """[batch, tokens, width] -> the input and every layer's output, each [batch, tokens, width].

    mask: as `CLIPAttention`'s, the same for every layer.
    """
    if self.scan_layers:
      _, outputs = layers.scan_layers(_scan_body, self.layers, x, mask, policy=self.remat)
      return (x, *outputs)  # outputs: [num_layers, batch, tokens, width]
    hidden_states = [x]
    call = layers.remat(_call_layer, self.remat)
    for layer in self.layers:
      hidden_states.append(call(layer, hidden_states[-1], mask))
    return tuple(hidden_states)


class CLIPVisionTransformer(nnx.Module):
  """CLIP ViT image encoder built from `config.model.vision`.

  Fields: image_size, patch_size, num_channels, hidden_size, intermediate_size, num_layers,
  num_heads, layer_norm_eps, hidden_act, select_layer, select_feature ("patch" | "cls_patch"),
  interpolate_pos_encoding (default for `__call__`). `scan_layers` stacks the encoder layers
  (see `CLIPEncoder`).
  """

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, remat: str = "none",
               scan_layers: bool = False, rngs: nnx.Rngs):
    if cfg.select_feature not in SELECT_FEATURES:
      raise ValueError(
          f"select_feature must be one of {SELECT_FEATURES}, got {cfg.select_feature!r}"
      )
    if not -(cfg.num_layers + 1) <= cfg.select_layer <= cfg.num_layers:
      raise ValueError(
          f"select_layer {cfg.select_layer} is out of range for {cfg.num_layers + 1} hidden states"
      )
    self.select_layer = cfg.select_layer
    self.keep_cls = cfg.select_feature == "cls_patch"
    self.interpolate_pos_encoding = bool(cfg.interpolate_pos_encoding)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
    norm = lambda: layers.layer_norm(cfg.hidden_size, "embed", epsilon=cfg.layer_norm_eps, **kw)
    # transformers' spelling "pre_layrnorm" keeps the parameter paths convertible by name.
    self.pre_layrnorm = norm()
    self.encoder = CLIPEncoder(cfg, remat=remat, scan_layers=scan_layers, **kw)
    self.post_layernorm = norm()

  @property
  def num_patches(self) -> int:
    """Patch tokens at the config's image size."""
    return self.embeddings.grid_side**2

  @property
  def num_feature_tokens(self) -> int:
    """Tokens in `features` at the config's image size (patches, plus CLS for "cls_patch")."""
    return self.num_patches + int(self.keep_cls)

  def __call__(
      self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool | None = None
  ) -> CLIPVisionOutput:
    """Encodes images.

    Args:
      pixel_values: [batch, height, width, channels], normalised as CLIP's processor does.
      interpolate_pos_encoding: resize the position embeddings (bicubic, as transformers) to
        the input's patch grid, allowing sizes other than image_size; None takes the config's.

    Returns:
      `CLIPVisionOutput`; see its docstring for shapes.
    """
    if interpolate_pos_encoding is None:
      interpolate_pos_encoding = self.interpolate_pos_encoding
    x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
    hidden_states = self.encoder(x)
    last = hidden_states[-1]
    features = hidden_states[self.select_layer]
    if not self.keep_cls:
      features = features[:, 1:]
    return CLIPVisionOutput(
        last_hidden_state=last,
        pooled=self.post_layernorm(last[:, 0]),
        hidden_states=hidden_states,
        features=features,
    )
