"""Parameters stored under their Flax paths (`unires_heads.safetensors`) into torch modules.

A torch module whose attribute names equal the Flax module's reads the file by three rules:

  torch parameter                          Flax path leaf   Flax layout
  nn.Linear `weight` [out, in]             `kernel`         [in, out]
  nn.Conv2d `weight` [out, in, kh, kw]     `kernel`         [kh, kw, in, out] (HWIO)
  nn.LayerNorm / nn.GroupNorm `weight`     `scale`          same
  anything else (`bias`, a bare Parameter) its own name     same

and `.` in the torch name becomes `/`: `mask_decoder.seg_proj.layers.0.weight` is read from
`mask_decoder/seg_proj/layers/0/kernel`, transposed.
"""

from collections.abc import Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

Convert = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
  return x


def _leaf(owner: nn.Module, name: str) -> tuple[str, Convert]:
  """The Flax leaf name of `owner`'s parameter `name`, and the Flax -> torch layout change."""
  if name == "weight" and isinstance(owner, nn.Linear):
    return "kernel", lambda k: k.T
  if name == "weight" and isinstance(owner, nn.Conv2d):
    return "kernel", lambda k: k.permute(3, 2, 0, 1)
  if name == "weight" and isinstance(owner, (nn.LayerNorm, nn.GroupNorm)):
    return "scale", _identity
  return name, _identity


def flax_paths(modules: Mapping[str, nn.Module]) -> dict[str, tuple[nn.Parameter, Convert]]:
  """Every parameter of `modules` (Flax path prefix -> module) by its Flax path."""
  out = {}
  for prefix, module in modules.items():
    for owner_name, owner in module.named_modules():
      for name, param in owner.named_parameters(recurse=False):
        leaf, convert = _leaf(owner, name)
        path = "/".join(p for p in (prefix, owner_name.replace(".", "/"), leaf) if p)
        out[path] = (param, convert)
  return out


def load_flax_params(modules: Mapping[str, nn.Module], path: str) -> None:
  """Copies the safetensors file `path` into `modules` (Flax path prefix -> module), in place.

  Raises:
    ValueError, naming `path` and the tensor: the file is unreadable, a parameter has no tensor,
      a tensor belongs to no parameter, or a tensor's shape does not fit its parameter.
  """
  try:
    tensors = load_file(path)
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  params = flax_paths(modules)
  for name in sorted(set(params) | set(tensors)):
    if name not in tensors:
      raise ValueError(f"{path}: tensor {name!r} is missing")
    if name not in params:
      raise ValueError(f"{path}: tensor {name!r} is not a parameter of this model")
  with torch.no_grad():
    for name, (param, convert) in params.items():
      value = convert(tensors[name])
      if value.shape != param.shape:
        raise ValueError(f"{path}: tensor {name!r} of shape {tuple(tensors[name].shape)} is "
                         f"{tuple(value.shape)} in torch's layout, but the parameter is "
                         f"{tuple(param.shape)}")
      param.copy_(value)
