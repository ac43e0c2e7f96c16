"""timm / open_clip ConvNeXt state dicts -> `unires_jax.models.convnext.ConvNeXt`, and back
(`save_convnext`: a timm state dict that `timm.create_model` loads).

Layouts read:
  * timm's own names: `stem.0.weight`, `stages.1.downsample.1.weight`,
    `stages.2.blocks.4.mlp.fc1.weight`, ... (a classifier `head.*` is ignored);
  * open_clip's CLIP ConvNeXt (e.g. `convnext_large_d_320`): the same names nested under
    `visual.trunk.`; the rest of the CLIP model (`visual.head.*`, the text tower) is ignored.

Rules (timm name -> our parameter path):
  stem.0                        conv  -> stem/0
  stem.1                        norm  -> stem/1
  stages.i.downsample.0         norm  -> stages/i/downsample/0      (i > 0)
  stages.i.downsample.1         conv  -> stages/i/downsample/1      (i > 0)
  stages.i.blocks.j.conv_dw     conv  -> stages/i/blocks/j/conv_dw  (depthwise [7, 7, 1, C])
  stages.i.blocks.j.norm        norm  -> stages/i/blocks/j/norm
  stages.i.blocks.j.mlp.fc1|2   linear-> stages/i/blocks/j/mlp/fc1|2
  stages.i.blocks.j.gamma       [C]   -> stages/i/blocks/j/gamma
"""

import json
import re
from typing import Mapping

import numpy as np

from unires_jax.convert import torch_io
from unires_jax.models.convnext import ConvNeXt

OPEN_CLIP_TRUNK = "visual.trunk."
# Top-level names of an open_clip CLIP model outside its vision trunk: the rest of the vision
# tower and the text tower (`text.` in CustomTextCLIP, the others in CLIP).
OPEN_CLIP_OTHER = (
    "visual.", "text.", "transformer.", "token_embedding.", "positional_embedding",
    "ln_final.", "text_projection", "logit_scale", "logit_bias",
)
_STEM_KEY = "stem.0.weight"
# Block tensors whose first dimension is the stage width; any of them gives depth and width, so
# one missing tensor is reported by name by the converter instead of as a config mismatch.
_BLOCK_RE = re.compile(
    r"stages\.(\d+)\.blocks\.(\d+)\.(conv_dw\.weight|conv_dw\.bias|norm\.weight|norm\.bias|"
    r"gamma|mlp\.fc2\.bias)")


def find_trunk_prefix(tensors: Mapping[str, np.ndarray], source: str = "state dict") -> str:
  """'visual.trunk.' for open_clip, '' for timm's own names; else a `CheckpointError`."""
  if any(name.startswith(OPEN_CLIP_TRUNK) for name in tensors):
    return OPEN_CLIP_TRUNK
  if any(name.startswith(("stem.", "stages.")) for name in tensors):
    return ""
  raise torch_io.CheckpointError(
      f"{source}: no ConvNeXt trunk found (no 'stem.*' / 'stages.*' or open_clip "
      f"{OPEN_CLIP_TRUNK + 'stem.*'!r} names); pass prefix= for another layout")


def convnext_config_from_state(
    tensors: Mapping[str, np.ndarray], prefix: str | None = None
) -> dict[str, object]:
  """{'in_chans', 'depths', 'dims'} of the trunk in a timm or open_clip state dict.

  `prefix` as in `load_convnext` (None: detected).
  """
  if prefix is None:
    prefix = find_trunk_prefix(tensors)
  trunk = torch_io.strip_prefix(tensors, prefix)
  if _STEM_KEY not in trunk:
    raise torch_io.CheckpointError(f"state dict: missing tensor {prefix + _STEM_KEY!r}")
  depths: dict[int, int] = {}
  dims: dict[int, int] = {}
  for name, value in trunk.items():
    match = _BLOCK_RE.fullmatch(name)
    if match:
      stage, block = int(match[1]), int(match[2])
      depths[stage] = max(depths.get(stage, 0), block + 1)
      dims[stage] = int(np.shape(value)[0])
  stages = sorted(depths)
  if not stages or stages != list(range(len(stages))):
    raise torch_io.CheckpointError(
        f"state dict: ConvNeXt stages under {prefix!r} are {stages}, expected 0, 1, 2, ...")
  return {
      "in_chans": int(np.shape(trunk[_STEM_KEY])[1]),
      "depths": tuple(depths[i] for i in stages),
      "dims": tuple(dims[i] for i in stages),
  }


def check_convnext_config(cfg: Mapping[str, object], inferred: Mapping[str, object]) -> None:
  """Raises a ValueError naming the first field where `cfg` disagrees with `inferred`."""
  for field, value in inferred.items():
    ours = cfg[field]
    if isinstance(value, tuple):
      ours = tuple(ours)
    if ours != value:
      raise ValueError(
          f"convnext config field {field!r} is {ours} but the checkpoint has {value}")


def _rules(depths: tuple[int, ...], prefix: str):
  """The name table above as a function of the stage depths."""

  def rules(state: torch_io.TorchState) -> dict[str, np.ndarray]:
    out = {}

    def put(ours, convert, theirs):
      out.update(torch_io.flatten_prefixed(ours, convert(state, prefix + theirs)))

    put("stem/0", torch_io.convert_conv, "stem.0")
    put("stem/1", torch_io.convert_norm, "stem.1")
    for i, depth in enumerate(depths):
      if i > 0:
        put(f"stages/{i}/downsample/0", torch_io.convert_norm, f"stages.{i}.downsample.0")
        put(f"stages/{i}/downsample/1", torch_io.convert_conv, f"stages.{i}.downsample.1")
      for j in range(depth):
        ours, theirs = f"stages/{i}/blocks/{j}", f"stages.{i}.blocks.{j}"
        put(f"{ours}/conv_dw", torch_io.convert_conv, f"{theirs}.conv_dw")
        put(f"{ours}/norm", torch_io.convert_norm, f"{theirs}.norm")
        put(f"{ours}/mlp/fc1", torch_io.convert_linear, f"{theirs}.mlp.fc1")
        put(f"{ours}/mlp/fc2", torch_io.convert_linear, f"{theirs}.mlp.fc2")
        out[f"{ours}/gamma"] = state.take(f"{prefix}{theirs}.gamma")
    return out

  return rules


def load_convnext(
    module: ConvNeXt,
    path_or_state: str | Mapping[str, np.ndarray],
    prefix: str | None = None,
) -> None:
  """Writes a timm / open_clip ConvNeXt state dict into `module`, in place.

  Args:
    module: the ConvNeXt to fill; its config must match the checkpoint (checked first).
    path_or_state: a `.safetensors` / `.bin` / `.pt` / `.pth` state-dict file, or a dict of
      arrays already read.
    prefix: where the trunk's timm names start. None detects timm ('') or open_clip
      ('visual.trunk.'). With an explicit prefix, everything outside it is taken to belong to
      another model and is ignored; with detection, only open_clip's own names are.

  Raises:
    CheckpointError: a trunk tensor is missing, or a tensor is left unused that is neither a
      classifier head nor (for open_clip) another part of the CLIP model.
    ValueError: the module's depths / dims / in_chans differ from the checkpoint's.
  """
  if isinstance(path_or_state, str):
    source, tensors = path_or_state, torch_io.read_state_file(path_or_state)
  else:
    source, tensors = "state dict", path_or_state
  explicit = prefix is not None
  if not explicit:
    prefix = find_trunk_prefix(tensors, source)
  inferred = convnext_config_from_state(tensors, prefix)
  check_convnext_config(
      {"in_chans": module.in_chans, "depths": module.depths, "dims": module.dims}, inferred)

  def allow_unused(name: str) -> bool:
    if name.startswith(prefix):
      return name.startswith(prefix + "head.")
    return explicit or name.startswith(OPEN_CLIP_OTHER)

  torch_io.convert_all(_rules(module.depths, prefix), tensors, module, source, allow_unused)


# timm model names by (depths, dims); others are written as convnext_tiny with their own args.
TIMM_NAMES = {
    ((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_tiny",
    ((3, 3, 27, 3), (96, 192, 384, 768)): "convnext_small",
    ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_base",
    ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_large",
    ((3, 3, 27, 3), (256, 512, 1024, 2048)): "convnext_xlarge",
}


def timm_name(depths, dims) -> str:
  """timm's name for a ConvNeXt of these stage depths and widths (convnext_tiny otherwise)."""
  return TIMM_NAMES.get((tuple(depths), tuple(dims)), "convnext_tiny")


def timm_spec(cfg: Mapping[str, object]) -> dict[str, object]:
  """How PyTorch users rebuild the ConvNeXt of `cfg` (`model.convnext`) in timm:
  `timm.create_model(spec["timm_model"], num_classes=0, **spec["model_args"])`."""
  return {"timm_model": timm_name(cfg["depths"], cfg["dims"]),
          "model_args": {"in_chans": cfg["in_chans"], "depths": list(cfg["depths"]),
                         "dims": list(cfg["dims"])}}


def export_plan(shapes: Mapping[str, tuple[int, ...]]) -> torch_io.ExportPlan:
  """timm names of a `ConvNeXt`'s parameters (`shapes`: {our path: shape}): the inverse of the
  table above. timm's classifier head (`head.norm`, `head.fc`) has no counterpart."""
  plan = {}
  for path, shape in shapes.items():
    parent, leaf = path.rsplit("/", 1)
    theirs = parent.replace("/", ".")
    if leaf == "gamma":
      plan[f"{theirs}.gamma"] = (path, torch_io.SAME)
    elif leaf in ("scale", "bias"):
      plan[f"{theirs}.{'weight' if leaf == 'scale' else 'bias'}"] = (path, torch_io.SAME)
    else:
      plan[f"{theirs}.weight"] = (path, torch_io.CONV if len(shape) == 4 else torch_io.LINEAR)
  return plan


def spec_metadata(spec: Mapping[str, object]) -> dict[str, str]:
  """The timm spec as safetensors metadata (string values)."""
  return {k: json.dumps(v) for k, v in spec.items()}


def save_convnext(module: ConvNeXt, out_dir: str) -> None:
  """Writes `module` as a new directory: `model.safetensors` (timm names, the `timm_spec` in its
  metadata) and `config.json` (the same spec)."""
  spec = timm_spec({"depths": module.depths, "dims": module.dims, "in_chans": module.in_chans})
  plan = export_plan(torch_io.module_shapes(module))
  torch_io.write_model_dir(out_dir, spec, torch_io.export_tensors(plan, module),
                           metadata=spec_metadata(spec))
