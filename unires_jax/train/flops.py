"""Analytic FLOPs of UniRES++: the forward pass, and forward + backward of one train step.

Convention: a multiply-add is 2 FLOPs, and only matrix products and convolutions are counted
(the model FLOPs of MFU, as in PaLM's appendix B). Elementwise work (norms, activations, softmax,
residuals, biases, RoPE, losses, the optimizer update), RoIAlign's bin weights and the bilinear
resizes of mask logits (attention masks, loss) are left out as negligible at full size; XLA counts
them, so its count is somewhat higher.

Forward, per component (B batch, T sequence length, a linear of fan-in i and fan-out o on n rows
costs 2 n i o):
  CLIP ViT (p patches of side P, tokens t = p + 1, width D, MLP width I, heads of total width D):
    patch conv 2 B p P^2 C D; per layer 4 * 2 B t D^2 (q, k, v, out) + 2 * 2 B t^2 D (scores,
    weighted values) + 2 * 2 B t D I. Only the layers up to `select_layer` run: the rest feed
    nothing the model returns, and XLA drops them (select_layer -2 of 24 runs 23). With
    `config.model.scan_layers` the scan runs every layer (24 of 24).
  ConvNeXt (stage i at side s_i = S / (4 * 2^i), width d_i): stem 2 B s_0^2 16 C d_0; downsample
    2 B s_i^2 4 d_{i-1} d_i; per block the depthwise 7x7 2 B d_i v(s_i, 7)^2 and the MLP
    2 * 2 B s_i^2 d_i 4 d_i.
  RoI features (`models.roi_align.roi_align_mean`: one weight per pixel and box): for each pooled
    stage 2 B n s_i^2 d_i, n = n_obj and n = n_part.
  Projectors (mlp2x_gelu): image on B n_img rows, object and part on B n_obj / B n_part rows of the
    concatenated RoI features (sum of the pooled stages' widths).
  LLaMA (width E, heads H, kv heads K, head_dim d, MLP M): per layer 2 B T E (H + 2K) d (q, k, v)
    + 2 B T H d E (o) + 2 * 2 B H T^2 d (scores and weighted values over the full sequence: the
    causal mask is applied to dense scores, which is what runs) + 3 * 2 B T E M (SwiGLU);
    LM head 2 B A E V at the A = max_answer_tokens positions training takes logits at (V with the
    special tokens).
  Mask decoder (width h, mask width m, FFN f, Q = 1 + n_obj + n_part queries, s_i as above):
    pixel decoder: lateral 1x1 2 B s_i^2 d_i h, output 3x3 2 B h^2 v(s_i, 3)^2, mask features
    2 B s_0^2 h m; query MLPs; per layer cross-attention to a level of N = s^2 pixels
    (2 * 2 B Q h^2 + 2 * 2 B N h^2 + 2 * 2 B Q N h), self-attention (4 * 2 B Q h^2 + 2 * 2 B Q^2 h)
    and FFN 2 * 2 B Q h f; L + 1 mask predictions, each the mask-embed MLP (3 linears on B Q rows)
    and the mask einsum 2 B Q s_0^2 m.
  No-target head: 2 B (E hidden + hidden).
v(s, k) counts the (output, tap) pairs of a stride-1 "same" convolution that read inside the
input along one axis: zero-padding taps are not work (XLA's cost analysis skips them too).

Backward, per product: its input gradient costs one forward when the input depends on a
trainable parameter, its weight gradient one forward when the weight is trainable (learning-rate
multiplier != 0 in `config.optimizer.lr_multipliers`). So a trainable layer deep in the network
costs 3x its forward, a frozen layer that gradients must cross 2x, a frozen tower below every
trainable parameter (stage 1's vision towers) 1x, and the first layer after it (projectors,
lateral convs) 2x. A product of two activations (attention scores) pays one forward per operand
that needs a gradient. Rematerialisation (`config.model.remat`) recomputes forwards in the
backward pass; those are hardware FLOPs, not model FLOPs, and are not counted.
"""

import dataclasses
from collections import defaultdict
from collections.abc import Mapping

import ml_collections

from unires_jax.models import convnext as convnext_lib
from unires_jax.models import prompt
from unires_jax.train import optimizer as optimizer_lib


@dataclasses.dataclass(frozen=True)
class Term:
  """One matrix product or convolution of the forward pass.

  path: the parameter path of its weight ("llm/model/layers/0/mlp/up_proj"), or the module path
    and what it computes for a product of two activations (".../self_attn/scores").
  forward: FLOPs of the forward pass.
  backward: FLOPs of its gradients in a train step (0, 1 or 2 times `forward`).
  """

  path: str
  forward: float
  backward: float


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Every counted product of one step; totals and per-module sums."""

  terms: tuple[Term, ...]

  @property
  def forward(self) -> float:
    return sum(t.forward for t in self.terms)

  @property
  def backward(self) -> float:
    return sum(t.backward for t in self.terms)

  @property
  def train(self) -> float:
    """Forward + backward: the model FLOPs of one train step."""
    return self.forward + self.backward

  def by_module(self) -> dict[str, tuple[float, float]]:
    """Top-level module ("vision", "llm", ...) -> (forward, train) FLOPs, in model order."""
    out = defaultdict(lambda: [0.0, 0.0])
    for t in self.terms:
      sums = out[t.path.split("/")[0]]
      sums[0] += t.forward
      sums[1] += t.forward + t.backward
    return {k: (f, tr) for k, (f, tr) in out.items()}


def valid_taps(size: int, kernel: int) -> int:
  """(output, tap) pairs of a stride-1 "same" convolution along one axis that read inside the
  input: `size * kernel` less the taps that fall on the zero padding."""
  pad = kernel // 2
  return sum(min(o + kernel - pad, size) - max(o - pad, 0) for o in range(size))


class _Counter:
  """Collects terms, deciding each one's backward from which parameters train.

  Gradient flags: each method takes whether its input depends on a trainable parameter (and so
  needs an input gradient) and returns whether its output does.
  """

  def __init__(self, multipliers: Mapping[str, float]):
    self.multipliers = dict(multipliers)
    self.terms: list[Term] = []

  def trainable(self, path: str) -> bool:
    """Whether a parameter under `path` trains (a longer key may unfreeze a part of it)."""
    if optimizer_lib.lr_multiplier(path, self.multipliers) != 0:
      return True
    return any(v != 0 and k.strip("/").startswith(path + "/") for k, v in self.multipliers.items())

  def params(self, path: str, grad: bool) -> bool:
    """Elementwise parameters (norms, embeddings, layer scales): no FLOPs counted."""
    return grad or self.trainable(path)

  def weight(self, path: str, flops: float, grad: bool, supervised: bool = True) -> bool:
    """`x @ W` (or a convolution) with W at `path`. `supervised=False`: nothing differentiates
    the output (it only feeds a stop_gradient), so it has no backward."""
    train = self.trainable(path)
    self.terms.append(Term(path, flops, flops * (train + grad) * supervised))
    return grad or train

  def linear(self, path: str, rows: int, fan_in: int, fan_out: int, grad: bool,
             supervised: bool = True) -> bool:
    return self.weight(path, 2 * rows * fan_in * fan_out, grad, supervised)

  def product(self, path: str, flops: float, grad_a: bool, grad_b: bool,
              supervised: bool = True) -> bool:
    """A product of two activations (attention scores, mask einsum)."""
    self.terms.append(Term(path, flops, flops * (grad_a + grad_b) * supervised))
    return grad_a or grad_b


def _attention(c: _Counter, path: str, names: tuple[str, str, str, str], batch: int, nq: int,
               nk: int, width: int, q_width: int, kv_width: int, grad_q: bool,
               grad_kv: bool) -> bool:
  """q/k/v projections, scores [batch, heads, nq, nk], weighted values, output projection."""
  q = c.linear(f"{path}/{names[0]}", batch * nq, width, q_width, grad_q)
  k = c.linear(f"{path}/{names[1]}", batch * nk, width, kv_width, grad_kv)
  v = c.linear(f"{path}/{names[2]}", batch * nk, width, kv_width, grad_kv)
  probs = c.product(f"{path}/scores", 2 * batch * nq * nk * q_width, q, k)
  out = c.product(f"{path}/weighted_values", 2 * batch * nq * nk * q_width, probs, v)
  return c.linear(f"{path}/{names[3]}", batch * nq, q_width, width, out)


def _no_target_head(c: _Counter, m: ml_collections.ConfigDict, batch: int, grad_text: bool,
                    grad_regions: bool) -> None:
  """models.no_target: the text prior and the match MLP over every proposal."""
  width, hidden, regions = m.llm.hidden_size, m.no_target_hidden, m.max_objects + m.max_parts
  prior = c.linear("no_target_head/fc1", batch, width, hidden, grad_text)
  c.linear("no_target_head/fc2", batch, hidden, 1, prior)
  query = c.linear("no_target_head/query", batch, width, hidden, grad_text)
  region = c.linear("no_target_head/region", batch * regions, width, hidden, grad_regions)
  match = c.linear("no_target_head/match_fc1", batch * regions, hidden, hidden, query or region)
  c.linear("no_target_head/match_fc2", batch * regions, hidden, 1, match)


def clip_layers_run(cfg: ml_collections.ConfigDict, scanned: bool) -> int:
  """CLIP layers a step computes (`config.model.vision`): scanned, all; unrolled, those up to
  `select_layer` (XLA drops the layers whose outputs nothing reads)."""
  return cfg.num_layers if scanned else cfg.select_layer % (cfg.num_layers + 1)


def _clip(c: _Counter, cfg: ml_collections.ConfigDict, batch: int, scanned: bool) -> bool:
  """The CLIP ViT layers up to `select_layer` (every layer when `scanned`); returns the
  features' gradient flag."""
  side = cfg.image_size // cfg.patch_size
  patches, width = side * side, cfg.hidden_size
  tokens = patches + 1
  c.linear("vision/embeddings/patch_embedding", batch * patches,
           cfg.patch_size**2 * cfg.num_channels, width, False)
  g = c.params("vision/embeddings", False)
  g = c.params("vision/pre_layrnorm", g)
  for i in range(clip_layers_run(cfg, scanned)):
    p = f"vision/encoder/layers/{i}"
    h = c.params(f"{p}/layer_norm1", g)
    g |= _attention(c, f"{p}/self_attn", ("q_proj", "k_proj", "v_proj", "out_proj"), batch,
                    tokens, tokens, width, width, width, h, h)
    h = c.params(f"{p}/layer_norm2", g)
    h = c.linear(f"{p}/mlp/fc1", batch * tokens, width, cfg.intermediate_size, h)
    g |= c.linear(f"{p}/mlp/fc2", batch * tokens, cfg.intermediate_size, width, h)
  return g


def _convnext(c: _Counter, cfg: ml_collections.ConfigDict, batch: int) -> list[bool]:
  """Stem and stages; returns the gradient flag of each stage output C2..C5."""
  dims, k = cfg.dims, convnext_lib.KERNEL_SIZE
  side = cfg.image_size // convnext_lib.STEM_PATCH
  c.linear("convnext/stem/0", batch * side**2, convnext_lib.STEM_PATCH**2 * cfg.in_chans,
           dims[0], False)
  g = c.params("convnext/stem", False)
  flags = []
  for i, depth in enumerate(cfg.depths):
    side = cfg.image_size // (convnext_lib.STEM_PATCH * 2**i)
    p = f"convnext/stages/{i}"
    if i > 0:
      g = c.params(f"{p}/downsample/0", g)
      g = c.linear(f"{p}/downsample/1", batch * side**2, 4 * dims[i - 1], dims[i], g)
    for j in range(depth):
      b, d = f"{p}/blocks/{j}", dims[i]
      h = c.weight(f"{b}/conv_dw", 2 * batch * d * valid_taps(side, k)**2, g)
      h = c.params(f"{b}/norm", h)
      h = c.linear(f"{b}/mlp/fc1", batch * side**2, d, convnext_lib.MLP_RATIO * d, h)
      h = c.linear(f"{b}/mlp/fc2", batch * side**2, convnext_lib.MLP_RATIO * d, d, h)
      g |= c.params(f"{b}/gamma", h)
    flags.append(g)
  return flags


def _projector(c: _Counter, path: str, cfg: ml_collections.ConfigDict, rows: int, fan_in: int,
               width: int, grad: bool) -> bool:
  for i in range(cfg.num_layers):
    grad = c.linear(f"{path}/layers/{i}", rows, fan_in if i == 0 else width, width, grad)
  return grad


def _llm(c: _Counter, cfg: ml_collections.ConfigDict, batch: int, tokens: int, head_tokens: int,
         grad_in: bool) -> bool:
  """Decoder layers over [batch, tokens], the LM head over [batch, head_tokens]; returns the
  hidden states' flag."""
  e, rows = cfg.hidden_size, batch * tokens
  g = c.params("llm/model/embed_tokens", grad_in)
  for i in range(cfg.num_layers):
    p = f"llm/model/layers/{i}"
    h = c.params(f"{p}/input_layernorm", g)
    g |= _attention(c, f"{p}/self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"), batch,
                    tokens, tokens, e, cfg.num_heads * cfg.head_dim,
                    cfg.num_kv_heads * cfg.head_dim, h, h)
    h = c.params(f"{p}/post_attention_layernorm", g)
    gate = c.linear(f"{p}/mlp/gate_proj", rows, e, cfg.intermediate_size, h)
    up = c.linear(f"{p}/mlp/up_proj", rows, e, cfg.intermediate_size, h)
    g |= c.linear(f"{p}/mlp/down_proj", rows, cfg.intermediate_size, e, gate or up)
  g = c.params("llm/model/norm", g)
  head = "llm/model/embed_tokens" if cfg.tie_word_embeddings else "llm/lm_head"
  c.linear(head, batch * head_tokens, e, cfg.vocab_size + prompt.num_special_tokens(), g)
  return g


def _mask_decoder(c: _Counter, m: ml_collections.ConfigDict, batch: int, stage_flags: list[bool],
                  grad_llm: bool) -> None:
  """Pixel decoder, query MLPs, masked-attention layers and the L + 1 mask predictions."""
  cfg, dims, width = m.mask_decoder, m.convnext.dims, m.llm.hidden_size
  h, p = cfg.hidden_dim, "mask_decoder"
  sides = [m.convnext.image_size // (convnext_lib.STEM_PATCH * 2**i) for i in range(len(dims))]
  levels, y = [False] * len(dims), False
  for i in reversed(range(len(dims))):
    x = c.linear(f"{p}/pixel_decoder/lateral_convs/{i}/conv", batch * sides[i]**2, dims[i], h,
                 stage_flags[i])
    x = c.params(f"{p}/pixel_decoder/lateral_convs/{i}/norm", x) or y
    y = c.weight(f"{p}/pixel_decoder/output_convs/{i}/conv",
                 2 * batch * h * h * valid_taps(sides[i], 3)**2, x)
    levels[i] = y = c.params(f"{p}/pixel_decoder/output_convs/{i}/norm", y)
  pixels = batch * sides[0]**2
  features = c.linear(f"{p}/pixel_decoder/mask_features", pixels, h, cfg.mask_dim, levels[0])

  q = c.linear(f"{p}/seg_proj/layers/0", batch, width, h, grad_llm)
  q = c.linear(f"{p}/seg_proj/layers/1", batch, h, h, q)
  num_q = 1
  if cfg.use_region_queries:
    regions = m.max_objects + m.max_parts
    r = c.linear(f"{p}/region_proj/layers/0", batch * regions, width, h, grad_llm)
    q |= c.linear(f"{p}/region_proj/layers/1", batch * regions, h, h, r)
    num_q += regions
  memory = [c.params(f"{p}/level_embed", levels[l]) for l in cfg.feature_levels]

  def predict(q: bool, supervised: bool) -> None:
    e = c.params(f"{p}/decoder_norm", q)
    for i, (fan_in, fan_out) in enumerate(((h, h), (h, h), (h, cfg.mask_dim))):
      e = c.linear(f"{p}/mask_embed/layers/{i}", batch * num_q, fan_in, fan_out, e, supervised)
    c.product(f"{p}/mask_einsum", 2 * pixels * num_q * cfg.mask_dim, e, features, supervised)

  predict(q, cfg.aux_loss)
  for l in range(cfg.num_layers):
    level = cfg.feature_levels[l % len(cfg.feature_levels)]
    kv = memory[l % len(cfg.feature_levels)]
    path = f"{p}/transformer_cross_attention_layers/{l}"
    q |= _attention(c, f"{path}/multihead_attn", ("q_proj", "k_proj", "v_proj", "out_proj"),
                    batch, num_q, sides[level]**2, h, h, h, q, kv)
    q = c.params(f"{path}/norm", q)
    path = f"{p}/transformer_self_attention_layers/{l}"
    q |= _attention(c, f"{path}/self_attn", ("q_proj", "k_proj", "v_proj", "out_proj"), batch,
                    num_q, num_q, h, h, h, q, q)
    q = c.params(f"{path}/norm", q)
    path = f"{p}/transformer_ffn_layers/{l}"
    f = c.linear(f"{path}/linear1", batch * num_q, h, cfg.ffn_dim, q)
    q |= c.linear(f"{path}/linear2", batch * num_q, cfg.ffn_dim, h, f)
    q = c.params(f"{path}/norm", q)
    predict(q, cfg.aux_loss or l == cfg.num_layers - 1)


def count_flops(config: ml_collections.ConfigDict, batch_size: int, seq_len: int) -> FlopCount:
  """The model FLOPs of one UniRES++ step on `batch_size` sequences of `seq_len` tokens.

  `config` is the whole config (`config.model` for the shapes, `config.optimizer.lr_multipliers`
  for what trains, `optimizer.multipliers_of`: with LoRA the LLM counts as frozen, its adapters'
  FLOPs, rank / width of the projections', left out). `seq_len` is the batch's
  `input_ids.shape[1]` (the pipeline's `preprocess.sample_spec(config.model,
  config.input).max_length`). The LM head runs at `config.model.max_answer_tokens` positions
  of each sequence, as in training (`models.unires.train_forward`). FLOPs do not depend on
  `config.train.accum_steps` (micro-batches split the same work) nor on the dtype.
  """
  m = config.model
  num_image = prompt.num_image_tokens(m.vision)
  if seq_len < num_image + m.max_objects + m.max_parts + 1:
    raise ValueError(f"seq_len={seq_len} cannot hold {num_image} image tokens, "
                     f"{m.max_objects + m.max_parts} region tokens and [SEG]")
  c = _Counter(optimizer_lib.multipliers_of(config))
  image = _clip(c, m.vision, batch_size, bool(m.get("scan_layers", False)))
  width = m.llm.hidden_size
  image = _projector(c, "image_projector", m.projector, batch_size * num_image,
                     m.vision.hidden_size, width, image)
  stages = _convnext(c, m.convnext, batch_size)
  for name, boxes in (("objects", m.max_objects), ("parts", m.max_parts)):
    for level in m.roi.levels:
      side = m.convnext.image_size // convnext_lib.STEM_PATCH // 2**level
      c.product(f"regions/{level}/{name}",
                2 * batch_size * boxes * side**2 * m.convnext.dims[level], False, stages[level])
  pooled = any(stages[l] for l in m.roi.levels)
  region_dim = sum(m.convnext.dims[l] for l in m.roi.levels)
  objects = _projector(c, "object_projector", m.projector, batch_size * m.max_objects,
                       region_dim, width, pooled)
  parts = _projector(c, "part_projector", m.projector, batch_size * m.max_parts, region_dim,
                     width, pooled)
  hidden = _llm(c, m.llm, batch_size, seq_len, m.max_answer_tokens, image or objects or parts)
  _mask_decoder(c, m, batch_size, stages, hidden)
  _no_target_head(c, m, batch_size, hidden, objects or parts)
  return FlopCount(tuple(c.terms))
