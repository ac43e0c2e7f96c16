"""The whole UniRES++ to and from a directory of PyTorch-loadable parts (issue 6, in memory):

  DIR/vision_tower/             transformers CLIPVisionModel      (clip_vit.save_clip_vision)
  DIR/high_res_encoder/         timm ConvNeXt state dict + spec   (convnext.save_convnext)
  DIR/llm/                      transformers LlamaForCausalLM, special-token rows included
  DIR/unires_heads.safetensors  every other parameter (projectors, mask decoder, no-target head)
                                under its path in the Flax model, e.g. "mask_decoder/query_embed"
  DIR/config.json               the `config.model` the parts were built from

The directory is written into a temporary sibling and renamed at the end, so a failure leaves
nothing behind. This works on a model in host memory; streaming from a sharded Orbax checkpoint
is not written yet.
"""

import os

import ml_collections
import numpy as np
from flax import nnx

from unires_jax.convert import clip_vit, convnext, llama, torch_io

BACKBONES = ("vision", "convnext", "llm")  # UniRES++ attributes exported through their libraries
HEADS_FILE = "unires_heads.safetensors"


def head_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """Every parameter outside the backbones, by path."""
  return {path: np.asarray(var[...]) for path, var in torch_io.iter_params(model)
          if path.split("/", 1)[0] not in BACKBONES}


def export_pytorch(model: nnx.Module, model_config: ml_collections.ConfigDict,
                   out_dir: str) -> None:
  """Writes `model` (built from `model_config` = `config.model`) as a new directory `out_dir`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  with torch_io.new_directory(out_dir) as tmp:
    clip_vit.save_clip_vision(model.vision, model_config.vision,
                              os.path.join(tmp, "vision_tower"))
    convnext.save_convnext(model.convnext, os.path.join(tmp, "high_res_encoder"))
    llama.save_llama(model.llm, os.path.join(tmp, "llm"))
    save_file(head_params(model), os.path.join(tmp, HEADS_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      f.write(model_config.to_json_best_effort(indent=2, sort_keys=True))


def import_pytorch(model: nnx.Module, model_config: ml_collections.ConfigDict,
                   model_dir: str) -> None:
  """Reads an `export_pytorch` directory into `model`, checking each part against the config."""
  clip_vit.load_clip_vision(model.vision, os.path.join(model_dir, "vision_tower"),
                            cfg=model_config.vision)
  convnext.load_convnext(model.convnext,
                         os.path.join(model_dir, "high_res_encoder", torch_io.SAFETENSORS_SINGLE))
  llama.load_llama(model.llm, os.path.join(model_dir, "llm"))
  source = os.path.join(model_dir, HEADS_FILE)
  heads = torch_io.read_state_file(source)
  expected = head_params(model)
  for name in sorted(set(expected) | set(heads)):
    if name not in expected or name not in heads:
      raise torch_io.CheckpointError(
          f"{source}: tensor {name!r} " + ("is not a parameter of this model" if name in heads
                                           else "is missing"))
  for attr in sorted({name.split("/", 1)[0] for name in expected}):
    torch_io.assign_params(getattr(model, attr), {
        name.split("/", 1)[1]: value for name, value in heads.items()
        if name.split("/", 1)[0] == attr}, source)
