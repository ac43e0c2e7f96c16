"""Importing a `transformers` LLaMA directory (e.g. lmsys/vicuna-7b-v1.5) into `LlamaForCausalLM`,
and exporting one back (`save_llama`) that `transformers.LlamaForCausalLM.from_pretrained` loads.

Weights may be single or sharded, safetensors or `.bin`. Checkpoints with tied embeddings have
no `lm_head.weight`. A model built with a larger `vocab_size` than the checkpoint's (UniRES++'s
added special tokens) keeps its own initial values in the extra rows.
"""

import math
from typing import Any, Mapping

import numpy as np

from unires_jax.convert import torch_io
from unires_jax.models.llama import LlamaForCausalLM

# transformers.LlamaConfig defaults, for config.json files that leave a field out.
_HF_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

# Our field -> config.json field (num_kv_heads, head_dim and rope_theta have fallbacks).
_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
}

# One decoder layer: transformers module -> our path, all without biases.
_LAYER_RULES = (
    ("input_layernorm", "input_layernorm"),
    ("self_attn.q_proj", "self_attn/q_proj"),
    ("self_attn.k_proj", "self_attn/k_proj"),
    ("self_attn.v_proj", "self_attn/v_proj"),
    ("self_attn.o_proj", "self_attn/o_proj"),
    ("post_attention_layernorm", "post_attention_layernorm"),
    ("mlp.gate_proj", "mlp/gate_proj"),
    ("mlp.up_proj", "mlp/up_proj"),
    ("mlp.down_proj", "mlp/down_proj"),
)

# Non-persistent buffers that transformers < 4.3x saved with the weights.
_UNUSED_SUFFIXES = ("rotary_emb.inv_freq",)


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """rope_theta from a transformers >= 5 `rope_parameters` or an older top-level field."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"config.json rope_type {rope_type!r} is not supported; only 'default'")
  return float(rope.get("rope_theta", hf.get("rope_theta", _HF_DEFAULTS["rope_theta"])))


def llm_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """config.json of a LlamaForCausalLM -> our fields of `model.llm`.

  Raises ValueError for LLaMA variants this model does not implement (biases, other
  activations, scaled rotary embeddings).
  """
  if hf.get("hidden_act", _HF_DEFAULTS["hidden_act"]) != "silu":
    raise ValueError(f"config.json hidden_act {hf['hidden_act']!r} is not supported; only 'silu'")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"config.json {flag}=true is not supported")
  out = {ours: hf.get(theirs, _HF_DEFAULTS[theirs]) for ours, theirs in _FIELDS.items()}
  out["num_kv_heads"] = hf.get("num_key_value_heads") or out["num_heads"]
  out["head_dim"] = hf.get("head_dim") or out["hidden_size"] // out["num_heads"]
  out["rope_theta"] = _rope_theta(hf)
  return out


def check_llm_config(cfg: Mapping[str, Any], hf: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first field where `cfg` (`model.llm`) and config.json differ."""
  for field, value in llm_config_from_hf(hf).items():
    ours = cfg[field]
    same = math.isclose(ours, value, rel_tol=1e-9) if isinstance(value, float) else ours == value
    if not same:
      raise ValueError(
          f"llm config field {field!r} is {ours!r} but the checkpoint's config.json says {value!r}"
      )


def _rules(num_layers: int, tied: bool):
  """The converter: transformers names -> our parameter paths."""

  def rules(state: torch_io.TorchState) -> dict[str, np.ndarray]:
    out = {"model/embed_tokens/embedding": state.take("model.embed_tokens.weight")}
    for i in range(num_layers):
      for theirs, ours in _LAYER_RULES:
        name, path = f"model.layers.{i}.{theirs}", f"model/layers/{i}/{ours}"
        if theirs.endswith("layernorm"):
          tree = torch_io.convert_norm(state, name, bias=False)
        else:
          tree = torch_io.convert_linear(state, name, bias=False)
        out.update(torch_io.flatten_prefixed(path, tree))
    norm = torch_io.convert_norm(state, "model.norm", bias=False)
    out.update(torch_io.flatten_prefixed("model/norm", norm))
    if not tied:
      head = torch_io.convert_linear(state, "lm_head", bias=False)
      out.update(torch_io.flatten_prefixed("lm_head", head))
    return out

  return rules


def _keep_extra_rows(module: LlamaForCausalLM, rules, source: str):
  """Wraps `rules` so vocabulary rows beyond the checkpoint's keep the module's values."""

  def padded(state: torch_io.TorchState) -> dict[str, np.ndarray]:
    out = rules(state)
    rows = out["model/embed_tokens/embedding"].shape[0]
    if rows > module.vocab_size:
      raise torch_io.CheckpointError(
          f"{source}: checkpoint has {rows} vocabulary rows, the model only {module.vocab_size}"
      )
    if rows < module.vocab_size:
      embedding = np.asarray(module.model.embed_tokens.embedding[...])
      out["model/embed_tokens/embedding"] = np.concatenate(
          [out["model/embed_tokens/embedding"].astype(embedding.dtype), embedding[rows:]]
      )
      if "lm_head/kernel" in out:
        kernel = np.asarray(module.lm_head.kernel[...])
        out["lm_head/kernel"] = np.concatenate(
            [out["lm_head/kernel"].astype(kernel.dtype), kernel[:, rows:]], axis=1
        )
    return out

  return padded


def _keep_adapters(module: LlamaForCausalLM, rules):
  """Wraps `rules` for a module with LoRA: its adapters keep their values, and the added rows'
  own parameters (`new_token_embedding`, `new_token_head`) start as the loaded table's rows."""
  if not module.lora.enabled:
    return rules

  def with_adapters(state: torch_io.TorchState) -> dict[str, np.ndarray]:
    out = rules(state)
    for path, (var, index) in torch_io.unstacked_params(module).items():
      if path.endswith(("/lora_a", "/lora_b")):
        out[path] = torch_io.read_unstacked(var, index)
    base = module.config.vocab_size
    if module.new_token_embedding is not None:
      out["new_token_embedding"] = out["model/embed_tokens/embedding"][base:]
    if module.new_token_head is not None:
      out["new_token_head"] = out["lm_head/kernel"][:, base:]
    return out

  return with_adapters


def load_llama(module: LlamaForCausalLM, model_dir: str) -> None:
  """Reads `model_dir` (config.json + weights) into `module`, checking the config first.

  The checkpoint's vocabulary is the config's (rows beyond it keep the module's values) or the
  module's whole one (a `save_llama` export of a model with added tokens). A module with LoRA
  keeps its adapters (`unires_jax.convert.lora.load_adapter` reads them)."""
  hf = torch_io.read_config_json(model_dir)
  expected = module.config._asdict()
  if hf.get("vocab_size") == module.vocab_size:  # an export of this model: added rows included
    expected["vocab_size"] = module.vocab_size
  check_llm_config(expected, hf)
  tensors = torch_io.read_state_dir(model_dir)
  tied = module.tie_word_embeddings
  rules = _keep_adapters(module, _keep_extra_rows(
      module, _rules(module.config.num_layers, tied), model_dir))
  torch_io.convert_all(
      rules,
      tensors,
      module,
      model_dir,
      # A tied checkpoint may still store lm_head.weight (a copy of the embeddings).
      allow_unused=lambda n: n.endswith(_UNUSED_SUFFIXES) or (tied and n == "lm_head.weight"),
  )


def hf_config(cfg: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
  """The config.json of a transformers LlamaForCausalLM built from `cfg` (`model.llm`) with
  `vocab_size` rows (UniRES++'s whole vocabulary, added rows included)."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": vocab_size, "hidden_size": cfg["hidden_size"],
      "intermediate_size": cfg["intermediate_size"], "num_hidden_layers": cfg["num_layers"],
      "num_attention_heads": cfg["num_heads"], "num_key_value_heads": cfg["num_kv_heads"],
      "head_dim": cfg["head_dim"], "rms_norm_eps": cfg["rms_norm_eps"],
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"]},
      "max_position_embeddings": cfg["max_position_embeddings"],
      "tie_word_embeddings": bool(cfg["tie_word_embeddings"]), "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False,
  }


def export_plan(shapes: Mapping[str, tuple[int, ...]]) -> torch_io.ExportPlan:
  """transformers names of a `LlamaForCausalLM`'s parameters (`shapes`: {our path: shape}): the
  inverse of the import rules. Tied models have no `lm_head`."""
  plan = {"model.embed_tokens.weight": ("model/embed_tokens/embedding", torch_io.SAME)}
  i = 0
  while f"model/layers/{i}/input_layernorm/scale" in shapes:
    for theirs, path in _LAYER_RULES:
      path = f"model/layers/{i}/{path}"
      plan[f"model.layers.{i}.{theirs}.weight"] = (
          (f"{path}/scale", torch_io.SAME) if theirs.endswith("layernorm")
          else (f"{path}/kernel", torch_io.LINEAR))
    i += 1
  plan["model.norm.weight"] = ("model/norm/scale", torch_io.SAME)
  if "lm_head/kernel" in shapes:
    plan["lm_head.weight"] = ("lm_head/kernel", torch_io.LINEAR)
  return plan


def save_llama(module: LlamaForCausalLM, out_dir: str) -> None:
  """Writes `module` as a new transformers model directory (config.json + model.safetensors).
  A module with LoRA writes its base weights: the adapters are not in it (`convert.lora`)."""
  plan = export_plan(torch_io.module_shapes(module))
  torch_io.write_model_dir(out_dir, hf_config(module.config._asdict(), module.vocab_size),
                           torch_io.export_tensors(plan, module))
