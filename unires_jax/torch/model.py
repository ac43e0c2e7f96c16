"""UniRES++ in PyTorch, loaded from a `unires_jax.convert.unires.export_pytorch` directory.

The backbones are the libraries' own models (transformers `CLIPVisionModel` and
`LlamaForCausalLM`, a timm ConvNeXt); the heads are `heads` and `mask_decoder`. `forward` takes
the JAX model's batch (see `unires_jax.models.unires`; images channels-last) as NumPy arrays or
tensors and computes what `UniRESPP.__call__` computes.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torchvision
import transformers
from safetensors.torch import load_file
from torch import nn

from unires_jax.torch import heads
from unires_jax.torch.flax_params import load_flax_params
from unires_jax.torch.mask_decoder import MaskDecoder

HEADS_FILE = "unires_heads.safetensors"
INPUT_KEYS = ("image_low", "image_high", "object_boxes", "object_valid", "part_boxes",
              "part_valid", "input_ids", "attention_mask")
HEADS = ("image_projector", "object_projector", "part_projector", "mask_decoder", "no_target_head")
# Appended to the LLM's base vocabulary in this order (`unires_jax.models.prompt`).
SPECIAL_TOKENS = ("image_start", "image_end", "image_patch", "object_start", "object_end",
                  "object_patch", "part_start", "part_end", "part_patch", "seg")


@dataclasses.dataclass
class UniRESOutput:
  """What a forward pass returns (as `unires_jax.models.unires.UniRESOutput`).

  logits:           [batch, tokens, vocab]
  mask_logits:      [batch, s_high/4, s_high/4]
  aux_mask_logits:  earlier decoder predictions, each [batch, s_high/4, s_high/4]
  no_target_logits: [batch]
  region_logits:    [batch, max_objects + max_parts], INVALID_LOGIT for padded proposals
  """

  logits: torch.Tensor
  mask_logits: torch.Tensor
  aux_mask_logits: list[torch.Tensor]
  no_target_logits: torch.Tensor
  region_logits: torch.Tensor


def load_convnext(model_dir: str) -> nn.Module:
  """The timm ConvNeXt trunk in `model_dir` (`config.json` spec + `model.safetensors`)."""
  with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
    spec = json.load(f)
  trunk = timm.create_model(spec["timm_model"], num_classes=0, **spec["model_args"])
  path = os.path.join(model_dir, "model.safetensors")
  result = trunk.load_state_dict(load_file(path), strict=False)
  missing = [k for k in result.missing_keys if not k.startswith("head.")]
  if missing or result.unexpected_keys:
    raise ValueError(f"{path}: not a ConvNeXt trunk of {spec}: missing {missing}, "
                     f"unexpected {result.unexpected_keys}")
  return trunk


class UniRESPP(nn.Module):
  """UniRES++ from `config.model` (a dict) and its three backbones; see the module doc."""

  def __init__(self, cfg: Mapping[str, Any], vision: transformers.CLIPVisionModel,
               convnext: nn.Module, llm: transformers.LlamaForCausalLM):
    super().__init__()
    self.cfg = cfg
    self.vision, self.convnext, self.llm = vision, convnext, llm
    base = cfg["llm"]["vocab_size"]
    self.special = {name: base + i for i, name in enumerate(SPECIAL_TOKENS)}
    width = cfg["llm"]["hidden_size"]
    dims = cfg["convnext"]["dims"]
    region_dim = sum(dims[l] for l in cfg["roi"]["levels"])
    projector = lambda in_features: heads.Projector(
        in_features, width, cfg["projector"]["num_layers"], cfg["projector"]["hidden_act"])
    self.image_projector = projector(cfg["vision"]["hidden_size"])
    self.object_projector = projector(region_dim)
    self.part_projector = projector(region_dim)
    self.mask_decoder = MaskDecoder(width, dims, cfg["mask_decoder"])
    self.no_target_head = heads.NoTargetHead(width, cfg["no_target_hidden"])

  @classmethod
  def from_pretrained(cls, model_dir: str) -> "UniRESPP":
    """Loads an `export_pytorch` directory, in eval mode."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
      cfg = json.load(f)
    model = cls(
        cfg,
        transformers.CLIPVisionModel.from_pretrained(os.path.join(model_dir, "vision_tower")),
        load_convnext(os.path.join(model_dir, "high_res_encoder")),
        transformers.LlamaForCausalLM.from_pretrained(os.path.join(model_dir, "llm")))
    load_flax_params({name: getattr(model, name) for name in HEADS},
                     os.path.join(model_dir, HEADS_FILE))
    return model.eval()

  @property
  def num_image_tokens(self) -> int:
    """`<img_patch>` placeholders per sequence."""
    vision = self.cfg["vision"]
    grid = vision["image_size"] // vision["patch_size"]
    return grid * grid + int(vision["select_feature"] == "cls_patch")

  def image_features(self, image_low: torch.Tensor) -> torch.Tensor:
    """CLIP tokens of `[batch, s_low, s_low, 3]` images: `[batch, num_image_tokens, width]`."""
    vision = self.cfg["vision"]
    hidden = self.vision(image_low.permute(0, 3, 1, 2), output_hidden_states=True,
                         interpolate_pos_encoding=vision["interpolate_pos_encoding"]).hidden_states
    features = hidden[vision["select_layer"]]
    return features if vision["select_feature"] == "cls_patch" else features[:, 1:]

  def region_features(self, stages: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """RoIAlign over the configured stages, mean-pooled, concatenated.

    stages: C2..C5 `[batch, dims[i], h_i, w_i]`; boxes `[batch, n, 4]` (x1, y1, x2, y2) in
    image_high pixels. Returns `[batch, n, sum(dims[levels])]`.
    """
    roi = self.cfg["roi"]
    batch, n = boxes.shape[:2]
    pooled = []
    for level in roi["levels"]:
      r = torchvision.ops.roi_align(
          stages[level], list(boxes.to(stages[level])), output_size=roi["output_size"],
          spatial_scale=1.0 / self.convnext.feature_info[level]["reduction"],
          sampling_ratio=roi["sampling_ratio"], aligned=roi["aligned"])
      pooled.append(r.mean(dim=(2, 3)).reshape(batch, n, -1))
    return torch.cat(pooled, dim=-1)

  def _check_placeholders(self, ids: torch.Tensor) -> None:
    """Raises a ValueError unless every row holds the placeholders the model fills in."""
    counts = {"seg": 1, "image_patch": self.num_image_tokens,
              "object_patch": self.cfg["max_objects"], "part_patch": self.cfg["max_parts"]}
    for name, want in counts.items():
      have = (ids == self.special[name]).sum(dim=1)
      bad = torch.nonzero(have != want).flatten()
      if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"batch['input_ids'] row {row} holds {int(have[row])} {name} tokens "
            f"(id {self.special[name]}), expected {want}; build sequences with "
            "unires_jax.models.prompt.build_sequence")

  def forward(self, batch: Mapping[str, Any]) -> UniRESOutput:
    """Runs the model on the JAX model's batch (NumPy arrays or tensors; other keys ignored).

    Args:
      batch: image_low `[batch, s_low, s_low, 3]` and image_high `[batch, s_high, s_high, 3]`,
        CLIP-normalised; object_boxes `[batch, max_objects, 4]` and part_boxes
        `[batch, max_parts, 4]`, (x1, y1, x2, y2) in image_high pixels; object_valid / part_valid
        `[batch, max_objects / max_parts]` bool; input_ids and attention_mask `[batch, tokens]`,
        laid out by `unires_jax.models.prompt.build_sequence`.
    """
    missing = [k for k in INPUT_KEYS if k not in batch]
    if missing:
      raise ValueError(f"batch is missing field {missing[0]!r} (needs {INPUT_KEYS})")
    device = self.llm.device
    batch = {k: torch.as_tensor(batch[k], device=device) for k in INPUT_KEYS}
    ids = batch["input_ids"].long()
    self._check_placeholders(ids)
    rows = torch.arange(ids.shape[0], device=device)

    # Multi-Granularity Vision Flow.
    image_tokens = self.image_projector(self.image_features(batch["image_low"]))
    stages = self.convnext.forward_intermediates(
        batch["image_high"].permute(0, 3, 1, 2), intermediates_only=True)
    object_tokens = self.object_projector(self.region_features(stages, batch["object_boxes"]))
    part_tokens = self.part_projector(self.region_features(stages, batch["part_boxes"]))

    # Visual features replace the embeddings of their placeholders, in order along each row.
    embeds = self.llm.get_input_embeddings()(ids)
    for name, feats in (("image_patch", image_tokens), ("object_patch", object_tokens),
                        ("part_patch", part_tokens)):
      embeds = embeds.masked_scatter((ids == self.special[name])[..., None], feats.to(embeds))

    # As the JAX LLM: rotary positions count real tokens only, padding takes its predecessor's.
    mask = batch["attention_mask"].long()
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                            use_cache=False).last_hidden_state
    logits = self.llm.lm_head(hidden)

    seg_states = hidden[rows, (ids == self.special["seg"]).int().argmax(dim=1)][:, None]
    width = hidden.shape[-1]
    region_states = torch.cat(
        [hidden[ids == self.special[name]].reshape(ids.shape[0], -1, width)
         for name in ("object_patch", "part_patch")], dim=1)
    region_valid = torch.cat([batch["object_valid"], batch["part_valid"]], dim=1).bool()

    decoded = self.mask_decoder(stages, seg_states, region_states, region_valid)
    no_target_logits, region_logits = self.no_target_head(
        seg_states[:, 0], torch.cat([object_tokens, part_tokens], dim=1), region_valid)
    return UniRESOutput(
        logits=logits,
        mask_logits=decoded.mask_logits[:, 0],
        aux_mask_logits=[m[:, 0] for m in decoded.aux_mask_logits],
        no_target_logits=no_target_logits,
        region_logits=region_logits)
