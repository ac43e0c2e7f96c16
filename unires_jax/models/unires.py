"""The UniRES++ assembly: Multi-Granularity Vision Flow, LLM, mask decoder, no-target head.

Batch (all arrays; `n_obj = config.max_objects`, `n_part = config.max_parts`):
  image_low       [batch, s_low, s_low, 3]     CLIP-normalised, s_low = vision.image_size
  image_high      [batch, s_high, s_high, 3]   CLIP-normalised, s_high = convnext.image_size
  object_boxes    [batch, n_obj, 4]            x1, y1, x2, y2 in image_high pixels
  object_valid    [batch, n_obj]               bool, proposal present
  part_boxes      [batch, n_part, 4]
  part_valid      [batch, n_part]
  input_ids       [batch, tokens]              int32, laid out by `prompt.build_sequence`
  attention_mask  [batch, tokens]              int32, 1 = attend
and, for the loss,
  loss_mask       [batch, tokens]              1 on LM targets (the answer)
  masks           [batch, s_high, s_high]      target mask (union of the targets), {0, 1}
  no_target       [batch]                      bool, the expression refers to nothing
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import flax.struct
import numpy as np
from flax import nnx

from unires_jax import sharding
from unires_jax.models import layers
from unires_jax.models import losses
from unires_jax.models import prompt
from unires_jax.models.clip_vit import CLIPVisionTransformer
from unires_jax.models.convnext import ConvNeXt
from unires_jax.models.llama import LlamaForCausalLM
from unires_jax.models.mask_decoder import MaskDecoder
from unires_jax.models.no_target import NoTargetHead
from unires_jax.models.roi_align import check_boxes
from unires_jax.models.roi_align import roi_align_mean

INPUT_KEYS = (
    "image_low", "image_high", "object_boxes", "object_valid", "part_boxes", "part_valid",
    "input_ids", "attention_mask",
)
LOSS_KEYS = ("loss_mask", "masks", "no_target")


class Projector(nnx.Module):
  """LLaVA's `mlp2x_gelu`: Linear(in, width) -> act -> Linear(width, width) (and deeper
  variants)."""

  def __init__(self, in_features: int, width: int, cfg: ml_collections.ConfigDict, *,
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if cfg.num_layers < 1:
      raise ValueError(f"projector.num_layers must be >= 1, got {cfg.num_layers}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List(
        [layers.linear(in_features, width, ("features", "mlp"), **kw)]
        + [layers.linear(width, width, ("mlp", "embed"), **kw) for _ in range(cfg.num_layers - 1)])
    self.act = layers.activation(cfg.hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., in_features]` -> `[..., width]`."""
    for i, layer in enumerate(self.layers):
      x = layer(x if i == 0 else self.act(x))
    return x


@flax.struct.dataclass
class UniRESOutput:
  """What a forward pass returns.

  logits:           [batch, n, vocab]  LM logits at `lm_positions`
  lm_positions:     [batch, n] int32  the positions `logits` holds: every token by default
                    (n = tokens), the answer in training (`losses.answer_positions`)
  mask_logits:      [batch, s_high/4, s_high/4]  final prediction of the [SEG] query
  aux_mask_logits:  list of earlier decoder predictions, same shape (deep supervision)
  no_target_logits: [batch]
  region_logits:    [batch, max_objects + max_parts]  how well each proposal matches the
                    expression (models.no_target), very negative for padded proposals
  """

  logits: jax.Array
  lm_positions: jax.Array
  mask_logits: jax.Array
  aux_mask_logits: list[jax.Array]
  no_target_logits: jax.Array
  region_logits: jax.Array


def _gather_tokens(x: jax.Array, is_slot: jax.Array, count: int) -> jax.Array:
  """Positions of the first `count` True entries of each row of `is_slot [batch, tokens]`."""
  return jax.vmap(lambda row: jnp.nonzero(row, size=count, fill_value=0)[0])(is_slot)


def _is_traced(*arrays) -> bool:
  return any(isinstance(a, jax.core.Tracer) for a in arrays)


class UniRESPP(nnx.Module):
  """UniRES++ (`config.model_name = "unires_pp"`), built from `config.model`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # Frozen: the config is static graph data, which jit caches on and so must be hashable.
    cfg = self.cfg = ml_collections.FrozenConfigDict(cfg)
    dtype = layers.parse_dtype(cfg.dtype)
    kw = dict(dtype=dtype, param_dtype=layers.parse_dtype(cfg.param_dtype), rngs=rngs)
    self.special = prompt.SpecialTokens.appended_to(cfg.llm.vocab_size)
    # Configs written before `scan_layers` existed build the unrolled layers.
    scan = bool(cfg.get("scan_layers", False))
    self.vision = CLIPVisionTransformer(cfg.vision, remat=cfg.remat, scan_layers=scan, **kw)
    self.convnext = ConvNeXt(cfg.convnext, scan_layers=scan, **kw)
    self.llm = LlamaForCausalLM(
        cfg.llm, vocab_size=cfg.llm.vocab_size + prompt.num_special_tokens(), remat=cfg.remat,
        scan_layers=scan, **kw)
    width = cfg.llm.hidden_size
    region_dim = sum(cfg.convnext.dims[l] for l in cfg.roi.levels)
    self.image_projector = Projector(cfg.vision.hidden_size, width, cfg.projector, **kw)
    self.object_projector = Projector(region_dim, width, cfg.projector, **kw)
    self.part_projector = Projector(region_dim, width, cfg.projector, **kw)
    self.mask_decoder = MaskDecoder(width, tuple(cfg.convnext.dims), cfg.mask_decoder,
                                    scan_layers=scan, **kw)
    self.no_target_head = NoTargetHead(width, cfg.no_target_hidden, **kw)

  @property
  def num_image_tokens(self) -> int:
    """`<img_patch>` placeholders per sequence at the configured image size."""
    return prompt.num_image_tokens(self.cfg.vision)

  def check_batch(self, batch: Mapping[str, Any]) -> None:
    """Raises a ValueError naming the field when `batch` does not fit this model.

    Shapes are checked always; values (one [SEG] per row, the placeholder counts, box
    coordinates) only when the arrays are concrete, i.e. outside `jax.jit`.
    """
    missing = [k for k in INPUT_KEYS if k not in batch]
    if missing:
      raise ValueError(f"batch is missing field {missing[0]!r} (needs {INPUT_KEYS})")
    b, t = batch["input_ids"].shape
    expected = {
        "attention_mask": (b, t),
        "object_boxes": (b, self.cfg.max_objects, 4),
        "object_valid": (b, self.cfg.max_objects),
        "part_boxes": (b, self.cfg.max_parts, 4),
        "part_valid": (b, self.cfg.max_parts),
    }
    for key, shape in expected.items():
      if tuple(batch[key].shape) != shape:
        raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {shape}")
    if _is_traced(*(batch[k] for k in INPUT_KEYS)):
      return
    ids = np.asarray(batch["input_ids"])
    counts = {
        "[SEG]": (self.special.seg, 1),
        "<img_patch>": (self.special.image_patch, self.num_image_tokens),
        "<obj_patch>": (self.special.object_patch, self.cfg.max_objects),
        "<part_patch>": (self.special.part_patch, self.cfg.max_parts),
    }
    for name, (token, want) in counts.items():
      have = (ids == token).sum(axis=1)
      bad = np.flatnonzero(have != want)
      if bad.size:
        raise ValueError(
            f"batch['input_ids'] row {bad[0]} holds {have[bad[0]]} {name} tokens (id {token}), "
            f"expected {want}; build sequences with unires_jax.models.prompt.build_sequence")
    for granularity in ("object", "part"):
      check_boxes(batch[f"{granularity}_boxes"], batch[f"{granularity}_valid"],
                  name=f"batch['{granularity}_boxes']")

  def _region_features(self, stages: list[jax.Array], boxes: jax.Array) -> jax.Array:
    """RoIAlign over the configured ConvNeXt stages, mean-pooled, concatenated.

    stages: C2..C5 `[batch, h_i, w_i, dims[i]]`; boxes `[batch, n, 4]` in image_high pixels.
    Returns `[batch, n, sum(dims[levels])]`.
    """
    roi = self.cfg.roi
    pooled = []
    for level in roi.levels:
      pooled.append(roi_align_mean(
          stages[level], boxes, output_size=roi.output_size,
          spatial_scale=1.0 / self.convnext.strides[level], sampling_ratio=roi.sampling_ratio,
          aligned=roi.aligned))
    return jnp.concatenate(pooled, axis=-1)

  def __call__(self, batch: Mapping[str, jax.Array], *,
               lm_positions: jax.Array | None = None) -> UniRESOutput:
    """The forward pass of a batch (module docstring); `lm_positions [batch, n]` int: where
    to compute the LM logits (default every token; training passes the answer's positions)."""
    self.check_batch(batch)
    cfg = self.cfg
    ids = batch["input_ids"]
    n_img, n_obj, n_part = self.num_image_tokens, cfg.max_objects, cfg.max_parts

    # Multi-Granularity Vision Flow.
    # Named scopes label each part's ops in HLO and profiles ("jit(step)/jvp(llm)/...").
    with jax.named_scope("vision"):
      image_tokens = self.image_projector(self.vision(batch["image_low"]).features)
    with jax.named_scope("convnext"):
      stages = self.convnext(batch["image_high"])
    with jax.named_scope("regions"):
      object_tokens = self.object_projector(self._region_features(stages, batch["object_boxes"]))
      part_tokens = self.part_projector(self._region_features(stages, batch["part_boxes"]))

    # Visual features replace the embeddings of their placeholders.
    embeds = self.llm.embed(ids)
    rows = jnp.arange(ids.shape[0])[:, None]
    slots = {}
    for name, token, count, feats in (
        ("image", self.special.image_patch, n_img, image_tokens),
        ("object", self.special.object_patch, n_obj, object_tokens),
        ("part", self.special.part_patch, n_part, part_tokens)):
      slots[name] = _gather_tokens(ids, ids == token, count)
      embeds = embeds.at[rows, slots[name]].set(feats.astype(embeds.dtype))
    embeds = sharding.constrain(embeds, "activation_batch", "activation_length", "activation_embed")

    if lm_positions is None:
      lm_positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    with jax.named_scope("llm"):
      logits, hidden, _ = self.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                   logit_positions=lm_positions)

    seg_pos = jnp.argmax(ids == self.special.seg, axis=1)
    seg_states = hidden[jnp.arange(ids.shape[0]), seg_pos][:, None]
    region_pos = jnp.concatenate([slots["object"], slots["part"]], axis=1)
    region_states = hidden[rows, region_pos]
    region_valid = jnp.concatenate(
        [batch["object_valid"], batch["part_valid"]], axis=1).astype(bool)

    with jax.named_scope("mask_decoder"):
      decoded = self.mask_decoder(stages, seg_states, region_states, region_valid)
    with jax.named_scope("no_target_head"):
      no_target_logits, region_logits = self.no_target_head(
          seg_states[:, 0], jnp.concatenate([object_tokens, part_tokens], axis=1), region_valid)
    return UniRESOutput(
        logits=logits,
        lm_positions=lm_positions,
        mask_logits=decoded.mask_logits[:, 0],
        aux_mask_logits=[m[:, 0] for m in decoded.aux_mask_logits],
        no_target_logits=no_target_logits,
        region_logits=region_logits,
    )


def train_forward(model: UniRESPP, batch: Mapping[str, jax.Array]) -> UniRESOutput:
  """The forward pass training takes: LM logits at the answer's positions only
  (`config.model.max_answer_tokens` per row), which `compute_loss` reads as it reads all."""
  positions = losses.answer_positions(batch["loss_mask"], model.cfg.max_answer_tokens)
  return model(batch, lm_positions=positions)


def compute_loss(
    outputs: UniRESOutput, batch: Mapping[str, jax.Array], weights: ml_collections.ConfigDict,
    aux_loss: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its parts (`lm`, `mask_bce`, `mask_dice`, `aux_mask`, `no_target`, `region`).

  The mask losses cover samples that have a target; no-target samples train the no-target head
  only. `aux_mask` is the BCE + Dice of the decoder's earlier predictions, summed over layers.
  `region` is `losses.region_selection_ce`: the proposals whose box the target mask covers by at
  least `weights.region_min_coverage` are the ones the expression selects.

  Both no-target losses see the logit shifted by the training prior
  (`losses.prior_adjusted_logits` with `weights.no_target_prior`), so the model's own
  `no_target_logits` estimate the log-odds under balanced classes.
  """
  missing = [k for k in LOSS_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing loss field {missing[0]!r} (needs {LOSS_KEYS})")
  no_target_logits = losses.prior_adjusted_logits(
      outputs.no_target_logits, weights.no_target_prior)
  has_target = 1.0 - batch["no_target"].astype(jnp.float32)
  parts = {"lm": losses.lm_cross_entropy(outputs.logits, outputs.lm_positions,
                                         batch["input_ids"], batch["loss_mask"])}
  parts["mask_bce"], parts["mask_dice"] = losses.mask_bce_dice(
      outputs.mask_logits, batch["masks"], has_target)
  aux = jnp.zeros((), jnp.float32)
  if aux_loss:
    for logits in outputs.aux_mask_logits:
      bce, dice = losses.mask_bce_dice(logits, batch["masks"], has_target)
      aux = aux + weights.mask_bce * bce + weights.mask_dice * dice
  parts["aux_mask"] = aux
  parts["no_target"] = losses.no_target_bce(no_target_logits, batch["no_target"])
  targets = losses.region_targets(
      batch["masks"], jnp.concatenate([batch["object_boxes"], batch["part_boxes"]], axis=1),
      jnp.concatenate([batch["object_valid"], batch["part_valid"]], axis=1),
      weights.region_min_coverage)
  parts["region"] = losses.region_selection_ce(
      outputs.region_logits, no_target_logits, targets, batch["no_target"])
  total = (weights.lm * parts["lm"] + weights.mask_bce * parts["mask_bce"]
           + weights.mask_dice * parts["mask_dice"] + parts["aux_mask"]
           + weights.no_target * parts["no_target"] + weights.region * parts["region"])
  return total, parts
