"""Importing a `transformers` CLIP vision tower into `models.clip_vit.CLIPVisionTransformer`,
and exporting one back (`save_clip_vision`) that `transformers.CLIPVisionModel` loads.

Accepted directories: a `CLIPVisionModel` or a full `CLIPModel` (the released
openai/clip-vit-large-patch14-336 is one), as `save_pretrained` writes them. Vision tensors are
named `vision_model.<name>` in full models and in vision models saved by transformers < 5, and
`<name>` in vision models saved by transformers >= 5; both are read.
"""

from typing import Any, Mapping

import numpy as np

from unires_jax.convert import torch_io

VISION_PREFIX = "vision_model."

# transformers.CLIPVisionConfig defaults, for config.json files that leave a field out.
_HF_DEFAULTS = {
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}

# Our field -> config.json field.
_FIELDS = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_act": "hidden_act",
}

# transformers activation name -> ours (models.layers.ACTIVATIONS).
_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}

# One encoder layer: transformers module -> our path and converter.
_LAYER_RULES = (
    ("layer_norm1", "layer_norm1", torch_io.convert_norm),
    ("self_attn.q_proj", "self_attn/q_proj", torch_io.convert_linear),
    ("self_attn.k_proj", "self_attn/k_proj", torch_io.convert_linear),
    ("self_attn.v_proj", "self_attn/v_proj", torch_io.convert_linear),
    ("self_attn.out_proj", "self_attn/out_proj", torch_io.convert_linear),
    ("layer_norm2", "layer_norm2", torch_io.convert_norm),
    ("mlp.fc1", "mlp/fc1", torch_io.convert_linear),
    ("mlp.fc2", "mlp/fc2", torch_io.convert_linear),
)

# Tensors of a full CLIPModel that the vision tower does not use, and non-trainable buffers.
_UNUSED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.")
_UNUSED_NAMES = ("logit_scale",)
_UNUSED_SUFFIXES = ("position_ids",)


def vision_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """config.json of a CLIPVisionModel or CLIPModel -> our architecture fields of `model.vision`.

  The usage fields (select_layer, select_feature, interpolate_pos_encoding) are not part of a
  checkpoint and are not returned.
  """
  hf = hf.get("vision_config", hf)
  out = {ours: hf.get(theirs, _HF_DEFAULTS[theirs]) for ours, theirs in _FIELDS.items()}
  out["hidden_act"] = activation_from_hf(out["hidden_act"])
  return out


def activation_from_hf(name: str) -> str:
  """A config.json `hidden_act` -> our activation name (`models.layers.ACTIVATIONS`)."""
  if name not in _ACTIVATIONS:
    raise ValueError(
        f"config.json hidden_act {name!r} is not supported; known: {sorted(_ACTIVATIONS)}"
    )
  return _ACTIVATIONS[name]


def check_vision_config(cfg: Mapping[str, Any], hf: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first field where `cfg` (model.vision) and config.json differ."""
  for field, value in vision_config_from_hf(hf).items():
    if cfg[field] != value:
      raise ValueError(
          f"vision config field {field!r} is {cfg[field]!r} but the checkpoint's config.json "
          f"says {value!r}"
      )


def _is_allowed_unused(name: str) -> bool:
  return (
      name.startswith(_UNUSED_PREFIXES) or name in _UNUSED_NAMES or name.endswith(_UNUSED_SUFFIXES)
  )


def encoder_values(state: torch_io.TorchState, prefix: str,
                   num_layers: int) -> dict[str, np.ndarray]:
  """`<prefix>encoder.layers.<i>.*` of a CLIP-style encoder (`models.clip_vit.CLIPEncoder`,
  also OWLv2's text tower) -> {'encoder/layers/<i>/...': array}."""
  out = {}
  for i in range(num_layers):
    for theirs, ours, convert in _LAYER_RULES:
      tree = convert(state, f"{prefix}encoder.layers.{i}.{theirs}")
      out.update(torch_io.flatten_prefixed(f"encoder/layers/{i}/{ours}", tree))
  return out


def vision_tower_values(state: torch_io.TorchState, prefix: str, num_layers: int,
                        pre_norm: str = "pre_layrnorm") -> dict[str, np.ndarray]:
  """A CLIP vision transformer's tensors under `prefix` -> {our `CLIPVisionTransformer` path:
  array}. `pre_norm` is the source's name of the norm before the encoder (OWLv2 spells it
  'pre_layernorm')."""
  take = lambda name: state.take(prefix + name)
  out = {
      "embeddings/class_embedding": take("embeddings.class_embedding"),
      "embeddings/position_embedding": take("embeddings.position_embedding.weight"),
  }
  out.update(
      torch_io.flatten_prefixed(
          "embeddings/patch_embedding",
          torch_io.convert_conv(state, prefix + "embeddings.patch_embedding", bias=False),
      )
  )
  for theirs, ours in ((pre_norm, "pre_layrnorm"), ("post_layernorm", "post_layernorm")):
    out.update(torch_io.flatten_prefixed(ours, torch_io.convert_norm(state, prefix + theirs)))
  out.update(encoder_values(state, prefix, num_layers))
  return out


def _rules(prefix: str, num_layers: int):
  """The converter: transformers names under `prefix` -> our parameter paths."""
  return lambda state: vision_tower_values(state, prefix, num_layers)


def load_clip_vision(module, model_dir: str, cfg: Mapping[str, Any] | None = None) -> None:
  """Writes the weights of a transformers CLIP directory into a `CLIPVisionTransformer`.

  Args:
    module: the `CLIPVisionTransformer` to fill (every parameter is overwritten).
    model_dir: directory with config.json and model.safetensors / pytorch_model.bin (sharded or
      not) of a CLIPVisionModel or CLIPModel.
    cfg: the module's `model.vision` config; when given, config.json is first checked against it
      (fields that do not show in parameter shapes, like layer_norm_eps, are only caught here).

  Raises:
    CheckpointError: a missing or unused tensor, or a shape that differs from the module's.
    ValueError: `cfg` differs from config.json.
  """
  if cfg is not None:
    check_vision_config(cfg, torch_io.read_config_json(model_dir))
  tensors = torch_io.read_state_dir(model_dir)
  prefix = VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in tensors) else ""
  torch_io.convert_all(
      _rules(prefix, module.encoder.num_layers),
      tensors,
      module,
      source=model_dir,
      allow_unused=_is_allowed_unused,
  )


def hf_vision_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`model.vision` -> the config.json of a transformers CLIPVisionModel."""
  to_hf = {ours: theirs for theirs, ours in _ACTIVATIONS.items() if theirs != "gelu_new"}
  out = {theirs: cfg[ours] for ours, theirs in _FIELDS.items()}
  out["hidden_act"] = to_hf[cfg["hidden_act"]]
  return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **out}


def export_plan(shapes: Mapping[str, tuple[int, ...]]) -> torch_io.ExportPlan:
  """CLIPVisionModel names (`vision_model.`) of a `CLIPVisionTransformer`'s parameters
  (`shapes`: {our path: shape})."""
  plan = {
      "embeddings.class_embedding": ("embeddings/class_embedding", torch_io.SAME),
      "embeddings.position_embedding.weight": ("embeddings/position_embedding", torch_io.SAME),
      "embeddings.patch_embedding.weight": ("embeddings/patch_embedding/kernel", torch_io.CONV),
  }
  modules = [("pre_layrnorm", "pre_layrnorm", torch_io.convert_norm)]
  i = 0
  while f"encoder/layers/{i}/layer_norm1/scale" in shapes:
    modules += [(f"encoder.layers.{i}.{theirs}", f"encoder/layers/{i}/{path}", convert)
                for theirs, path, convert in _LAYER_RULES]
    i += 1
  modules.append(("post_layernorm", "post_layernorm", torch_io.convert_norm))
  for theirs, path, convert in modules:
    is_norm = convert is torch_io.convert_norm
    plan[f"{theirs}.weight"] = ((f"{path}/scale", torch_io.SAME) if is_norm
                                else (f"{path}/kernel", torch_io.LINEAR))
    plan[f"{theirs}.bias"] = (f"{path}/bias", torch_io.SAME)
  return {VISION_PREFIX + k: v for k, v in plan.items()}


def save_clip_vision(module, cfg: Mapping[str, Any], out_dir: str) -> None:
  """Writes `module` (built from `cfg` = `model.vision`) as a new transformers CLIPVisionModel
  directory (config.json + model.safetensors)."""
  plan = export_plan(torch_io.module_shapes(module))
  torch_io.write_model_dir(out_dir, hf_vision_config(cfg), torch_io.export_tensors(plan, module))
