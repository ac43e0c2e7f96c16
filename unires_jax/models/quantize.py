"""Weight-only post-training quantization of the linear layers with qwix (int8, int4).

`config.model.quantize`:
  weights    "none", "int8" or "int4": the type the kernels of the quantized layers are stored in.
  parts      the top-level modules whose `nnx.Linear` layers are quantized, comma-separated:
             llm (every LLaMA projection and the LM head), vision (CLIP ViT), convnext (its
             pointwise MLPs), mask_decoder, image_projector, object_projector, part_projector,
             no_target_head. Convolutions, embeddings and norms stay in `model.param_dtype`.
  tile_size  0: one scale per output channel; n > 0: one per n input rows and output channel
             (sub-channel, for int4). A layer whose input width n does not divide keeps one scale
             per output channel.

`quantize(model, cfg)` replaces each such kernel (`[in, out]`, or `[layers, in, out]` in a
stacked layer of `scan_layers`) by a qwix `QArray`: `qvalue` of the same shape in the weight type
and `scale` `[1, out]` (`[in / tile_size, out]` with tiles; a leading `[layers]` when stacked) in
the kernel's dtype, symmetric (absmax). Both are `nnx.Param`s with the kernel's logical axis
names, so the sharding rules, checkpoints (`checkpoint.restore_params`, `save_converted`) and
`nnx.split` / `merge` handle them as any parameter. qwix's PTQ provider intercepts each quantized
layer's `dot_general` and multiplies by the stored integers; activations stay in `model.dtype`.

qwix quantizes an NNX model by running it once and replacing each weight as its layer reads it;
inside `jax.lax.scan` (stacked layers) that replacement is lost, so the kernels are quantized here
directly, the stacked ones with one scale per layer, and qwix only wraps the model
(`skip_nnx_init`). Call `quantize` under `jax.jit` or `nnx.eval_shape`: it clones the model.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx
# qwix 0.1.8 has no public name for the PTQ weight (an array with how it was quantized) nor for
# how to quantize one; its own `quantize_model` builds them from these.
from qwix._src.core.qarray import HowToQuantize
from qwix._src.providers.ptq import WithAux

from unires_jax.models import layers

WEIGHT_TYPES = {"int8": jnp.int8, "int4": jnp.int4}
PARTS = ("llm", "vision", "convnext", "mask_decoder", "image_projector", "object_projector",
         "part_projector", "no_target_head")
# The setting of a config written before quantization existed (its config.json has none).
DEFAULTS = dict(weights="none", parts="llm,vision", tile_size=0)


def weights(cfg: ml_collections.ConfigDict) -> str:
  """`cfg.quantize.weights` of `config.model`: "none" for a config without the field."""
  return cfg.quantize.weights if "quantize" in cfg else "none"


def enabled(cfg: ml_collections.ConfigDict) -> bool:
  """Whether `cfg` (`config.model`) quantizes any weights; its settings are checked."""
  if weights(cfg) == "none":
    return False
  q = cfg.quantize
  if q.weights not in WEIGHT_TYPES:
    raise ValueError(f"config.model.quantize.weights={q.weights!r}: expected 'none' or one of "
                     f"{sorted(WEIGHT_TYPES)}")
  unknown = sorted(set(parts(cfg)) - set(PARTS))
  if unknown or not parts(cfg):
    raise ValueError(f"config.model.quantize.parts={q.parts!r}: expected a comma-separated "
                     f"choice of {PARTS}" + (f", not {unknown[0]!r}" if unknown else ""))
  if q.tile_size < 0:
    raise ValueError(f"config.model.quantize.tile_size={q.tile_size} must be 0 (per channel) or "
                     "positive")
  return True


def parts(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(p.strip() for p in cfg.quantize.parts.split(",") if p.strip())


def _targets(model: nnx.Module, cfg: ml_collections.ConfigDict) -> dict[tuple, nnx.Linear]:
  """The `nnx.Linear` layers under the quantized parts, by module path."""
  chosen = set(parts(cfg))
  return {path: module for path, module in nnx.iter_modules(model)
          if isinstance(module, nnx.Linear) and path and str(path[0]) in chosen}


def _how(kernel: nnx.Variable, qtype, tile_size: int) -> HowToQuantize:
  """Per output channel (and per layer when stacked), tiled over the input rows if asked."""
  ndim = kernel.get_value().ndim
  in_axis = ndim - 2
  channels = (ndim - 1,) + ((0,) if layers.is_stacked(kernel) else ())
  tiles = ({in_axis: tile_size}
           if tile_size and kernel.get_value().shape[in_axis] % tile_size == 0 else {})
  return HowToQuantize(qtype=qtype, channelwise_axes=channels, tiled_axes=tiles)


def _quantized(kernel: nnx.Variable, how: HowToQuantize) -> WithAux:
  """The kernel as qwix's PTQ weight, every array in it an `nnx.Param` with the kernel's
  metadata (logical axis names)."""
  value = qwix.quantize(kernel.get_value(), how.qtype, channelwise_axes=how.channelwise_axes,
                        tiled_axes=how.tiled_axes)
  return WithAux(jax.tree.map(kernel.replace, value), how)


def quantize(model: nnx.Module, cfg: ml_collections.ConfigDict) -> nnx.Module:
  """A copy of `model` whose linear layers under `cfg.quantize.parts` hold quantized kernels
  and compute with them (see the module doc). `model` may be abstract (`nnx.eval_shape`)."""
  if not enabled(cfg):
    return model
  targets = _targets(model, cfg)
  if not targets:
    raise ValueError(f"config.model.quantize.parts={cfg.quantize.parts!r} holds no linear layer")
  qtype = WEIGHT_TYPES[cfg.quantize.weights]
  # The rule matches exactly the quantized layers: any other dot_general (attention, einsums
  # over activations) is left to JAX as it is.
  rule = qwix.QuantizationRule(
      module_path="|".join(re.escape("/".join(map(str, p))) for p in targets),
      weight_qtype=qtype, op_names=("dot_general",))
  quantized = qwix.quantize_model(model, qwix.PtqProvider([rule]), skip_nnx_init=True)
  for path, module in nnx.iter_modules(quantized):
    if path in targets:
      module.kernel = _quantized(module.kernel, _how(module.kernel, qtype,
                                                     cfg.quantize.tile_size))
  return quantized
