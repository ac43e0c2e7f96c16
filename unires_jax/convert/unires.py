"""The whole UniRES++ to and from a directory of PyTorch-loadable parts:

  DIR/vision_tower/             transformers CLIPVisionModel      (clip_vit.export_plan)
  DIR/high_res_encoder/         timm ConvNeXt state dict + spec   (convnext.export_plan)
  DIR/llm/                      transformers LlamaForCausalLM, special-token rows included, and
                                the tokenizer with the special tokens added when there is one
  DIR/unires_heads.safetensors  every other parameter (projectors, mask decoder, no-target head)
                                under its path in the Flax model, e.g. "mask_decoder/query_embed"
  DIR/config.json               the `config.model` the parts were built from
  DIR/llm_adapter/              with `lora_adapter`: the LLM's LoRA adapter in PEFT's layout
                                (`unires_jax.convert.lora`); a LoRA model's llm/ is merged and
                                its config.json says `llm.lora.rank = 0`

`export_pytorch` writes a model in memory, `export_checkpoint` a checkpoint on disk; both stream:
tensors are read in groups of at most `group_bytes`, converted and appended to their safetensors
file, so host memory holds one group, not the model. The directory is written into a temporary
sibling and renamed at the end: a failure leaves nothing behind.
"""

import json
import os
from typing import Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from unires_jax import checkpoint, models, utils
from unires_jax.convert import clip_vit, convnext, llama, torch_io
from unires_jax.convert import lora as lora_convert
from unires_jax.models import layers, prompt
from unires_jax.models import lora as lora_lib

BACKBONES = ("vision", "convnext", "llm")  # UniRES++ attributes exported through their libraries
HEADS_FILE = "unires_heads.safetensors"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype("bfloat16")}
GROUP_BYTES = 1 << 30  # at most this much checkpoint data in host memory at once (unless one
                       # tensor is larger)
FILLER_TOKEN = "<unires_unused_{}>"  # pads a tokenizer up to the model's base vocabulary
# Parameters of the LLM that hold UniRES++'s added vocabulary rows (fresh in a released LLaMA).
VOCAB_PARAMS = ("llm/model/embed_tokens/embedding", "llm/lm_head/kernel")


def is_head(path: str) -> bool:
  """Whether the parameter at `path` lies outside the backbones (goes to HEADS_FILE)."""
  return path.split("/", 1)[0] not in BACKBONES


class ModuleParams:
  """The parameters of a model in memory, as an export source."""

  def __init__(self, model: nnx.Module):
    self._vars = torch_io.unstacked_params(model)  # stacked layers: one entry per layer
    self.shapes = torch_io.module_shapes(model)
    self.itemsizes = {path: np.dtype(var.get_value().dtype).itemsize
                      for path, (var, _) in self._vars.items()}

  def read(self, paths: list[str]) -> dict[str, np.ndarray]:
    return {path: torch_io.read_unstacked(*self._vars[path]) for path in paths}


class CheckpointParams:
  """The parameters of a checkpoint on disk (`checkpoint.locate`), read tensor by tensor on the
  host: a sharded checkpoint is never gathered onto a device.

  A stacked-layer parameter (`config.model.scan_layers`) shows as one entry per layer under its
  unrolled path, as `ModuleParams` shows it; reading a layer reads the whole stacked tensor
  (all layers of that weight), so host memory then holds one stacked tensor per path read.
  """

  def __init__(self, where: checkpoint.Located):
    self._where = where
    self.shapes, self.itemsizes = {}, {}
    self._stored: dict[str, tuple[str, int | None]] = {}  # unrolled path -> (saved path, layer)
    for path, (shape, dtype) in checkpoint.param_shapes(where).items():
      if layers.is_stacked_path(path):
        entries = {layers.layer_path(path, i): (path, i, shape[1:]) for i in range(shape[0])}
      else:
        entries = {path: (path, None, shape)}
      for unrolled, (saved, index, one) in entries.items():
        self._stored[unrolled] = (saved, index)
        self.shapes[unrolled], self.itemsizes[unrolled] = one, dtype.itemsize

  def read(self, paths: list[str]) -> dict[str, np.ndarray]:
    saved = checkpoint.read_params(self._where, sorted({self._stored[p][0] for p in paths}))
    out = {}
    for path in paths:
      name, index = self._stored[path]
      out[path] = saved[name] if index is None else saved[name][index]
    return out


def _groups(names: list[str], sizes: Mapping[str, int], limit: int) -> list[list[str]]:
  """`names` in order, cut into runs of at most `limit` bytes (a larger tensor alone)."""
  groups, current, total = [], [], 0
  for name in names:
    if current and total + sizes[name] > limit:
      groups.append(current)
      current, total = [], 0
    current.append(name)
    total += sizes[name]
  return groups + [current] if current else groups


def _write_tensors(source, prefix: str, plan: torch_io.ExportPlan, path: str, dtype: np.dtype,
                   metadata: Mapping[str, str], group_bytes: int) -> None:
  """Writes `plan`'s tensors (Flax paths under `prefix` in `source`) as the safetensors `path`."""
  shapes = {name: source.shapes[prefix + p] for name, (p, _) in plan.items()}
  layout = {name: (torch_io.torch_shape(shapes[name], plan[name][1]), dtype) for name in plan}
  sizes = {name: int(np.prod(shapes[name], dtype=np.int64)) * source.itemsizes[prefix + p]
           for name, (p, _) in plan.items()}
  with torch_io.SafetensorsWriter(path, layout, {**metadata, "format": "pt"}) as writer:
    for group in _groups(list(plan), sizes, group_bytes):
      values = source.read([prefix + plan[name][0] for name in group])
      for name in group:
        p, how = plan[name]
        writer.write(name, torch_io.to_torch(values.pop(prefix + p), how).astype(dtype))


def _mib(source, prefix: str, plan: torch_io.ExportPlan, dtype: np.dtype) -> float:
  return sum(int(np.prod(source.shapes[prefix + p], dtype=np.int64)) * dtype.itemsize
             for p, _ in plan.values()) / 2**20


def _write_json(path: str, value: Mapping) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(value), f, indent=2, sort_keys=True)


def write_tokenizer(tokenizer_dir: str, model_config: ml_collections.ConfigDict,
                    out_dir: str) -> None:
  """Saves the tokenizer of `tokenizer_dir` into `out_dir` with UniRES++'s special tokens added
  at the ids the model gives them (the rows after `llm.vocab_size`). A tokenizer smaller than the
  base vocabulary is padded with `FILLER_TOKEN`s first, so the ids still line up."""
  from unires_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
  base, strings = model_config.llm.vocab_size, dict(model_config.special_tokens)
  expected = prompt.SpecialTokens.appended_to(base)
  if [tok.convert_tokens_to_ids(strings[f]) for f in prompt.SPECIAL_TOKEN_FIELDS] == [
      getattr(expected, f) for f in prompt.SPECIAL_TOKEN_FIELDS]:  # an export's own tokenizer
    tok.save_pretrained(out_dir)
    return
  if len(tok) > base:
    raise ValueError(f"tokenizer {tokenizer_dir} has {len(tok)} tokens, more than "
                     f"model.llm.vocab_size={base}")
  if len(tok) < base:
    tok.add_special_tokens({"additional_special_tokens": [
        FILLER_TOKEN.format(i) for i in range(base - len(tok))]})
  special = prompt.SpecialTokens.from_tokenizer(tok, strings)
  if special != expected:
    raise ValueError(f"tokenizer {tokenizer_dir}: the special tokens got ids {special}, the "
                     f"model expects {expected}")
  tok.save_pretrained(out_dir)


def write_export(source, model_config: ml_collections.ConfigDict, out_dir: str, *,
                 dtype: str = "float32", tokenizer_dir: str | None = None,
                 group_bytes: int = GROUP_BYTES, lora_adapter: bool = False,
                 base_model: str | None = None,
                 progress: Callable[[str], None] = lambda message: None) -> None:
  """Writes the parameters of `source` (`ModuleParams` or `CheckpointParams`), a UniRES++ built
  from `model_config` (= `config.model`), as the new directory `out_dir` (see the module doc).

  Args:
    dtype: "float32" or "bfloat16", the dtype of every written tensor.
    tokenizer_dir: a tokenizer to save in `out_dir/llm`, special tokens added (optional).
    group_bytes: at most this many bytes of parameters are read at once.
    lora_adapter: also write the LoRA adapter as `out_dir/llm_adapter` (a model with LoRA).
    base_model: the adapter's `base_model_name_or_path` (e.g. lmsys/vicuna-7b-v1.5).
    progress: called with a line per part written.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
  out_dtype, cfg = DTYPES[dtype], model_config
  lora = lora_lib.read_lora_config(cfg.llm.get("lora"))
  if lora_adapter and not lora.enabled:
    raise ValueError("lora_adapter: the model has no LoRA adapter (config.model.llm.lora.rank=0)")
  adapted = source
  if lora.enabled:
    source = lora_convert.Merged(adapted, lora, cfg.llm.vocab_size)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.llm.lora.rank = 0  # what llm/ holds: the merged model

  def sub(prefix: str) -> dict[str, tuple[int, ...]]:
    return {p[len(prefix):]: s for p, s in source.shapes.items() if p.startswith(prefix)}

  vocab = source.shapes["llm/model/embed_tokens/embedding"][0]
  spec = convnext.timm_spec(cfg.convnext)
  parts = (  # (subdirectory, parameter prefix, plan, config.json, safetensors metadata)
      ("vision_tower", "vision/", clip_vit.export_plan(sub("vision/")),
       {**clip_vit.hf_vision_config(cfg.vision), "dtype": dtype}, {}),
      ("high_res_encoder", "convnext/", convnext.export_plan(sub("convnext/")), spec,
       convnext.spec_metadata(spec)),
      ("llm", "llm/", llama.export_plan(sub("llm/")),
       {**llama.hf_config(cfg.llm, vocab), "dtype": dtype}, {}),
  )
  for _, prefix, plan, _, _ in parts:
    unexported = sorted(set(sub(prefix)) - {p for p, _ in plan.values()})
    if unexported:
      raise ValueError(f"parameter {prefix + unexported[0]!r} has no PyTorch name in the export")
  with utils.new_directory(out_dir) as tmp:
    for subdir, prefix, plan, config_json, metadata in parts:
      os.makedirs(os.path.join(tmp, subdir))
      _write_json(os.path.join(tmp, subdir, "config.json"), config_json)
      _write_tensors(source, prefix, plan, os.path.join(tmp, subdir, torch_io.SAFETENSORS_SINGLE),
                     out_dtype, metadata, group_bytes)
      progress(f"{subdir}: {len(plan)} tensors, {_mib(source, prefix, plan, out_dtype):.1f} MiB")
    heads = {p: (p, torch_io.SAME) for p in source.shapes if is_head(p)}
    _write_tensors(source, "", heads, os.path.join(tmp, HEADS_FILE), out_dtype, {}, group_bytes)
    progress(f"{HEADS_FILE}: {len(heads)} tensors, {_mib(source, '', heads, out_dtype):.1f} MiB")
    if lora_adapter:
      _write_adapter(adapted, model_config, vocab, os.path.join(tmp, lora_convert.ADAPTER_DIR),
                     out_dtype, group_bytes, base_model, progress)
    if tokenizer_dir:
      write_tokenizer(tokenizer_dir, cfg, os.path.join(tmp, "llm"))
      progress("llm: tokenizer with the special tokens")
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))


def _write_adapter(source, model_config: ml_collections.ConfigDict, vocab: int, out_dir: str,
                   dtype: np.dtype, group_bytes: int, base_model: str | None,
                   progress: Callable[[str], None]) -> None:
  """The LLM's LoRA adapter as PEFT's directory `out_dir` (`unires_jax.convert.lora`)."""
  lora = lora_lib.read_lora_config(model_config.llm.lora)
  plan = lora_convert.adapter_plan(p[len("llm/"):] for p in source.shapes if p.startswith("llm/"))
  os.makedirs(out_dir)
  _write_json(os.path.join(out_dir, lora_convert.CONFIG_FILE),
              lora_convert.adapter_config(lora, model_config.llm, vocab, base_model))
  _write_tensors(source, "llm/", plan, os.path.join(out_dir, lora_convert.WEIGHTS_FILE), dtype,
                 {}, group_bytes)
  progress(f"{lora_convert.ADAPTER_DIR}: {len(plan)} tensors, "
           f"{_mib(source, 'llm/', plan, dtype):.1f} MiB")


def export_pytorch(model: nnx.Module, model_config: ml_collections.ConfigDict, out_dir: str,
                   **kwargs) -> None:
  """Writes `model` (built from `model_config` = `config.model`) as a new directory `out_dir`
  (`write_export`'s keyword arguments apply)."""
  write_export(ModuleParams(model), model_config, out_dir, **kwargs)


def export_checkpoint(path: str, out_dir: str, *, step: int | None = None, **kwargs) -> None:
  """Writes the checkpoint under `path` (`checkpoint.locate`: a training work directory or a
  converted checkpoint, with its config.json) as a new directory `out_dir`, streaming; the
  config's tokenizer goes into `out_dir/llm` when it is a local directory."""
  where = checkpoint.locate(path, step)
  config = where.config()
  tokenizer = config.input.get("tokenizer")
  if tokenizer and not os.path.isdir(tokenizer):
    tokenizer = None
  write_export(CheckpointParams(where), config.model, out_dir, tokenizer_dir=tokenizer, **kwargs)


def import_pytorch(model: nnx.Module, model_config: ml_collections.ConfigDict,
                   model_dir: str) -> None:
  """Reads an `export_pytorch` directory into `model`, checking each part against the config."""
  clip_vit.load_clip_vision(model.vision, os.path.join(model_dir, "vision_tower"),
                            cfg=model_config.vision)
  convnext.load_convnext(model.convnext,
                         os.path.join(model_dir, "high_res_encoder", torch_io.SAFETENSORS_SINGLE))
  llama.load_llama(model.llm, os.path.join(model_dir, "llm"))
  load_heads(model, os.path.join(model_dir, HEADS_FILE))


def head_paths(model: nnx.Module) -> list[str]:
  """Every parameter outside the backbones, by path (a stacked mask-decoder layer's once per
  layer, under its unrolled path: `torch_io.unstacked_params`)."""
  return [path for path in torch_io.unstacked_params(model) if is_head(path)]


def load_heads(model: nnx.Module, source: str) -> None:
  """Sets every parameter outside the backbones from the safetensors file `source`."""
  heads = torch_io.read_state_file(source)
  expected = set(head_paths(model))
  for name in sorted(expected | set(heads)):
    if name not in expected or name not in heads:
      raise torch_io.CheckpointError(
          f"{source}: tensor {name!r} " + ("is not a parameter of this model" if name in heads
                                           else "is missing"))
  for attr in sorted({name.split("/", 1)[0] for name in expected}):
    torch_io.assign_params(getattr(model, attr), {
        name.split("/", 1)[1]: value for name, value in heads.items()
        if name.split("/", 1)[0] == attr}, source)


def _fresh_parameters(config: ml_collections.ConfigDict, seed: int) -> dict[str, jax.Array]:
  """Freshly initialised parameters outside the backbones, and the LLM's vocabulary tables (whose
  added rows a released LLaMA lacks). The whole model is traced, but only these are computed:
  XLA drops the initialisers of everything else."""

  def init():
    model = models.build_model(config, layers.ParamKeys(seed))
    return {path: var[...] for path, var in torch_io.iter_params(model)
            if is_head(path) or path in VOCAB_PARAMS or isinstance(var, nnx.LoRAParam)}

  return jax.jit(init)()


def import_released(config: ml_collections.ConfigDict, *, vision_dir: str, convnext_file: str,
                    llm_dir: str, heads_file: str | None = None, llm_adapter: str | None = None,
                    seed: int = 0) -> nnx.Module:
  """A UniRES++ (`config`) whose backbones carry released PyTorch weights: a transformers CLIP
  (vision tower or whole CLIP model) directory, a timm / open_clip ConvNeXt state dict (or an
  export's `high_res_encoder/`) and a transformers LLaMA directory. The other parameters
  (projectors, mask decoder, no-target head, the added vocabulary rows) are freshly initialised
  from `seed`, or read from `heads_file` (an export's `unires_heads.safetensors`). With LoRA on
  (`config.model.llm.lora`), the adapters start fresh (B = 0: the model computes what the
  released LLM does) or are read from `llm_adapter` (a PEFT adapter directory, e.g. an export's
  `llm_adapter/`).

  Each backbone's config is checked against its weights (the error names the first field that
  differs). Host memory holds the model once plus the source tensor being converted: the model
  starts abstract and each parameter is materialised only when its value is known.
  """
  model = nnx.eval_shape(lambda: models.build_model(config, layers.ParamKeys(seed)))
  params = dict(torch_io.iter_params(model))
  for path, value in _fresh_parameters(config, seed).items():
    params[path].set_value(value)
  if heads_file:
    load_heads(model, heads_file)
  clip_vit.load_clip_vision(model.vision, vision_dir, cfg=config.model.vision)
  if os.path.isdir(convnext_file):  # an export's high_res_encoder/
    convnext_file = os.path.join(convnext_file, torch_io.SAFETENSORS_SINGLE)
  convnext.load_convnext(model.convnext, convnext_file)
  llama.load_llama(model.llm, llm_dir)
  if llm_adapter:
    lora_convert.load_adapter(model.llm, llm_adapter)
  return model
