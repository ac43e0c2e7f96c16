"""A LoRA-adapted LLM (`unires_jax.models.lora`) out to PyTorch: merged, or as a PEFT adapter; and
a PEFT adapter back in.

Merged (`Merged`): the LLM of a LoRA model read as the plain model that computes the same
(without dropout): each adapted kernel W + (alpha / rank) A B, the added vocabulary rows taken
from `new_token_embedding` / `new_token_head`. The export's `llm/` is that model.

PEFT (`adapter_plan`, `adapter_config`): `llm_adapter/` holds `adapter_config.json` and
`adapter_model.safetensors` as `peft.PeftModel.save_pretrained` writes them (peft 0.21):

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight    [rank, in]   A^T
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight    [out, rank]  B^T
  base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta  [added, hidden]
  base_model.model.lm_head.token_adapter.trainable_tokens_delta             [added, hidden]

The last two are PEFT's trainable tokens (`trainable_token_indices`, the ids from the base
vocabulary on): the values of the added rows, which replace the base model's. The base is the
LLM the run started from, its vocabulary resized to the model's (`resize_token_embeddings`):
`peft.PeftModel.from_pretrained(base, DIR/llm_adapter)`.
"""

import json
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

from unires_jax.convert import torch_io
from unires_jax.models import lora as lora_lib
from unires_jax.models.llama import LlamaForCausalLM

ADAPTER_DIR = "llm_adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The added-row parameters of LlamaForCausalLM -> (transformers module, layout).
_TOKENS = {"new_token_embedding": ("model.embed_tokens", torch_io.SAME),
           "new_token_head": ("lm_head", torch_io.LINEAR)}
_ADAPTER_LEAVES = ("lora_a", "lora_b")


def is_adapter(path: str) -> bool:
  """Whether the LLM parameter at `path` (with or without the `llm/` prefix) is LoRA's."""
  return path.rsplit("/", 1)[-1] in _ADAPTER_LEAVES + tuple(_TOKENS)


def adapter_plan(paths: Iterable[str]) -> torch_io.ExportPlan:
  """PEFT names of an LLM's adapter parameters (`paths`: the LLM's unrolled parameter paths)."""
  paths = set(paths)
  plan = {}
  for path in sorted(paths):
    if path.endswith("/lora_a"):
      module = path[: -len("/lora_a")]
      name = PEFT_PREFIX + module.replace("/", ".")
      plan[f"{name}.lora_A.weight"] = (path, torch_io.LINEAR)
      plan[f"{name}.lora_B.weight"] = (f"{module}/lora_b", torch_io.LINEAR)
  for path, (module, how) in _TOKENS.items():
    if path in paths:
      plan[f"{PEFT_PREFIX}{module}.token_adapter.trainable_tokens_delta"] = (path, how)
  return plan


def _token_indices(base_vocab: int, vocab: int, tied: bool) -> dict[str, list[int]] | None:
  tokens = list(range(base_vocab, vocab))
  if not tokens:
    return None
  return {"embed_tokens": tokens} if tied else {"embed_tokens": tokens, "lm_head": tokens}


def adapter_config(lora: lora_lib.LoRAConfig, llm_cfg: Mapping[str, Any], vocab: int,
                   base_model: str | None = None) -> dict[str, Any]:
  """adapter_config.json of a LoRA model (`llm_cfg` = `config.model.llm`, `vocab` rows)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
      "target_modules": sorted(lora.targets), "bias": "none", "fan_in_fan_out": False,
      "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
      "modules_to_save": None,
      "trainable_token_indices": _token_indices(llm_cfg["vocab_size"], vocab,
                                                bool(llm_cfg["tie_word_embeddings"])),
  }


class Merged:
  """A parameter source (`convert.unires.ModuleParams` or `CheckpointParams`) of a LoRA model,
  seen as the merged plain model: no adapter parameters, adapted kernels and vocabulary tables
  read merged (module docstring). `base_vocab`: `config.model.llm.vocab_size`."""

  def __init__(self, source, lora: lora_lib.LoRAConfig, base_vocab: int, prefix: str = "llm/"):
    self._source, self._scale, self._base, self._prefix = source, lora.scale, base_vocab, prefix
    self.shapes = {p: s for p, s in source.shapes.items()
                   if not (p.startswith(prefix) and is_adapter(p))}
    self.itemsizes = source.itemsizes

  def _needs(self, path: str) -> tuple[str, ...]:
    """The adapter parameters the merged value of `path` reads."""
    p = self._prefix
    if path.endswith("/kernel") and path[: -len("kernel")] + "lora_a" in self._source.shapes:
      return (path[: -len("kernel")] + "lora_a", path[: -len("kernel")] + "lora_b")
    for table, new in ((f"{p}model/embed_tokens/embedding", f"{p}new_token_embedding"),
                       (f"{p}lm_head/kernel", f"{p}new_token_head")):
      if path == table and new in self._source.shapes:
        return (new,)
    return ()

  def read(self, paths: list[str]) -> dict[str, np.ndarray]:
    needs = {path: self._needs(path) for path in paths}
    values = self._source.read(sorted(set(paths).union(*needs.values())))
    out = {}
    for path in paths:
      value = values[path]
      if len(needs[path]) == 2:
        a, b = (values[n].astype(np.float32) for n in needs[path])
        value = lora_lib.merged_kernel(value.astype(np.float32), a, b, self._scale)
      elif needs[path]:
        value, new = np.array(value), values[needs[path][0]]
        if path.endswith("embedding"):
          value[self._base:] = new
        else:
          value[:, self._base:] = new
      out[path] = value
    return out


def _check_config(found: Mapping[str, Any], module: LlamaForCausalLM, source: str) -> None:
  """Raises a CheckpointError naming the first adapter_config.json field that does not match
  the module's `config.model.llm.lora` (or its vocabulary)."""
  lora, where = module.lora, "config.model.llm.lora"
  if found.get("peft_type") != "LORA":
    raise torch_io.CheckpointError(f"{source}: peft_type is {found.get('peft_type')!r}, not LORA")
  checks = (("r", found.get("r"), lora.rank, f"{where}.rank"),
            ("lora_alpha", found.get("lora_alpha"), lora.alpha, f"{where}.alpha"),
            ("target_modules", sorted(found.get("target_modules") or []), sorted(lora.targets),
             f"{where}.targets"))
  for field, theirs, ours, name in checks:
    same = (math.isclose(theirs, ours) if isinstance(ours, float) and theirs is not None
            else theirs == ours)
    if not same:
      raise torch_io.CheckpointError(f"{source}: {field}={theirs!r} but {name}={ours!r}")
  tied = module.tie_word_embeddings
  want = _token_indices(module.config.vocab_size, module.vocab_size, tied)
  got = found.get("trainable_token_indices")
  if isinstance(got, list):
    got = {"embed_tokens": got}
  if got != want:
    raise torch_io.CheckpointError(
        f"{source}: trainable_token_indices={got!r}, the model's added rows are {want!r}")


def load_adapter(module: LlamaForCausalLM, adapter_dir: str) -> None:
  """Reads a PEFT LoRA adapter directory (laid out as the module docstring says) into the
  adapter parameters of `module`, built with the matching `config.model.llm.lora` (checked
  against adapter_config.json); the base weights are left as they are. Safetensors only:
  nothing is unpickled."""
  config_path = os.path.join(adapter_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise torch_io.CheckpointError(f"{adapter_dir}: no {CONFIG_FILE}")
  with open(config_path, encoding="utf-8") as f:
    _check_config(json.load(f), module, config_path)
  source = os.path.join(adapter_dir, WEIGHTS_FILE)
  tensors = torch_io.read_state_file(source)
  paths = [p for p, (var, _) in torch_io.unstacked_params(module).items()
           if isinstance(var, nnx.LoRAParam)]
  plan = adapter_plan(paths)
  extra = sorted(set(tensors) - set(plan))
  if extra:
    raise torch_io.CheckpointError(f"{source}: tensor {extra[0]!r} is not an adapter of this model")
  values = {}
  for name, (path, how) in plan.items():
    if name not in tensors:
      raise torch_io.CheckpointError(f"{source}: tensor {name!r} is missing")
    value = np.asarray(tensors[name])
    values[path] = value.T if how == torch_io.LINEAR else value
  torch_io.assign_params(module, values, source, consume=True, select=nnx.LoRAParam)
