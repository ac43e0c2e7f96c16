"""Importing a `transformers` OWLv2 detector (`Owlv2ForObjectDetection`, as `save_pretrained`
writes it: config.json + model.safetensors, or the released google/owlv2-* directories) into
`models.owlv2.Owlv2ForObjectDetection`.

Rules (transformers name -> our parameter path):
  owlv2.vision_model.*               -> vision_model/*   (CLIP vision rules, `clip_vit`;
                                         pre_layernorm -> pre_layrnorm)
  owlv2.text_model.embeddings.token_embedding|position_embedding.weight
                                     -> text_model/embeddings/token_embedding|position_embedding
  owlv2.text_model.encoder.layers.i.*-> text_model/encoder/layers/i/*  (CLIP encoder rules)
  owlv2.text_model.final_layer_norm  -> text_model/final_layer_norm
  owlv2.visual_projection|text_projection (no bias) -> visual_projection|text_projection
  owlv2.logit_scale                  -> logit_scale
  class_head.dense0|logit_shift|logit_scale, box_head.dense0..2, objectness_head.dense0..2,
  layer_norm                         -> the same path with '/'
The buffers `position_ids` and `box_bias`, which some checkpoints store, are recomputed.
"""

from typing import Any, Mapping

import ml_collections
import numpy as np
from flax import nnx

from unires_jax.convert import clip_vit as convert_clip
from unires_jax.convert import torch_io
from unires_jax.models import owlv2

# (our section, our field, config.json field, transformers' default for a field left out).
_TOWER = (
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "intermediate_size"),
    ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"),
    ("layer_norm_eps", "layer_norm_eps"),
    ("hidden_act", "hidden_act"),
)
_HF_DEFAULTS = {
    "vision": {"image_size": 768, "patch_size": 16, "num_channels": 3, "hidden_size": 768,
               "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"},
    "text": {"vocab_size": 49408, "max_position_embeddings": 16, "hidden_size": 512,
             "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
             "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"},
}
_FIELDS = {
    "vision": (("image_size", "image_size"), ("patch_size", "patch_size"),
               ("num_channels", "num_channels")) + _TOWER,
    "text": (("vocab_size", "vocab_size"),
             ("max_position_embeddings", "max_position_embeddings")) + _TOWER,
}

_HEADS = (
    ("class_head.dense0", "class_head/dense0"),
    ("class_head.logit_shift", "class_head/logit_shift"),
    ("class_head.logit_scale", "class_head/logit_scale"),
) + tuple((f"{head}.dense{i}", f"{head}/dense{i}")
          for head in ("box_head", "objectness_head") for i in range(3))

_BUFFERS = ("position_ids", "box_bias")


def config_from_hf(hf: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """An Owlv2ForObjectDetection config.json -> our `owlv2` config."""
  out = {}
  for section, fields in _FIELDS.items():
    theirs = {**_HF_DEFAULTS[section], **hf.get(f"{section}_config", {})}
    out[section] = {ours: theirs[name] for ours, name in fields}
    out[section]["hidden_act"] = convert_clip.activation_from_hf(out[section]["hidden_act"])
    if isinstance(out[section].get("image_size"), (list, tuple)):
      raise ValueError(f"config.json vision_config image_size {out[section]['image_size']} is "
                       "not square; OWLv2 here takes one side")
  out["projection_dim"] = hf.get("projection_dim", 512)
  return ml_collections.ConfigDict(out)


def check_config(cfg: Mapping[str, Any], hf: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first field (e.g. 'text.num_heads') where our config `cfg`
  and the checkpoint's config.json differ."""
  theirs = config_from_hf(hf)
  fields = [("projection_dim", cfg["projection_dim"], theirs.projection_dim)]
  for section, pairs in _FIELDS.items():
    fields += [(f"{section}.{ours}", cfg[section][ours], theirs[section][ours])
               for ours, _ in pairs]
  for name, mine, value in fields:
    if mine != value:
      raise ValueError(f"owlv2 config field {name!r} is {mine!r} but the checkpoint's "
                       f"config.json says {value!r}")


def _rules(num_vision_layers: int, num_text_layers: int):
  """The converter: transformers names -> our parameter paths."""

  def rules(state: torch_io.TorchState) -> dict[str, np.ndarray]:
    out = torch_io.flatten_prefixed("vision_model", convert_clip.vision_tower_values(
        state, "owlv2.vision_model.", num_vision_layers, pre_norm="pre_layernorm"))
    text = "owlv2.text_model."
    out.update({
        "text_model/embeddings/token_embedding":
            state.take(text + "embeddings.token_embedding.weight"),
        "text_model/embeddings/position_embedding":
            state.take(text + "embeddings.position_embedding.weight"),
    })
    out.update(torch_io.flatten_prefixed(
        "text_model", convert_clip.encoder_values(state, text, num_text_layers)))
    out.update(torch_io.flatten_prefixed(
        "text_model/final_layer_norm", torch_io.convert_norm(state, text + "final_layer_norm")))
    for name in ("visual_projection", "text_projection"):
      out.update(torch_io.flatten_prefixed(
          name, torch_io.convert_linear(state, f"owlv2.{name}", bias=False)))
    out["logit_scale"] = state.take("owlv2.logit_scale")
    for theirs, ours in _HEADS:
      out.update(torch_io.flatten_prefixed(ours, torch_io.convert_linear(state, theirs)))
    out.update(torch_io.flatten_prefixed(
        "layer_norm", torch_io.convert_norm(state, "layer_norm")))
    return out

  return rules


def load_owlv2(module: owlv2.Owlv2ForObjectDetection, model_dir: str,
               cfg: Mapping[str, Any] | None = None) -> None:
  """Writes the weights of a transformers OWLv2 directory into `module` (every parameter).

  Args:
    module: the `Owlv2ForObjectDetection` to fill.
    model_dir: config.json and model.safetensors (or a sharded / pickled variant) of an
      Owlv2ForObjectDetection.
    cfg: the module's config; when given, config.json is checked against it first (fields that
      no parameter shape shows, like layer_norm_eps or hidden_act, are only caught here).

  Raises:
    CheckpointError: a missing or unused tensor (named), or a shape that differs from ours.
    ValueError: `cfg` differs from config.json (the field is named).
  """
  if cfg is not None:
    check_config(cfg, torch_io.read_config_json(model_dir))
  torch_io.convert_all(
      _rules(module.vision_model.encoder.num_layers, module.text_model.encoder.num_layers),
      torch_io.read_state_dir(model_dir), module, source=model_dir,
      allow_unused=lambda name: name.endswith(_BUFFERS))


def from_pretrained(
    model_dir: str, *, dtype=None, param_dtype=np.float32
) -> tuple[owlv2.Owlv2ForObjectDetection, ml_collections.ConfigDict]:
  """Builds the detector that config.json describes and loads its weights: (module, config).

  The module starts abstract (`nnx.eval_shape`): each parameter is materialised only when its
  value is read from the checkpoint.
  """
  cfg = config_from_hf(torch_io.read_config_json(model_dir))
  module = nnx.eval_shape(lambda: owlv2.Owlv2ForObjectDetection(
      cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  load_owlv2(module, model_dir)
  return module, cfg
