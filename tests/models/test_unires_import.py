"""The README's recipe: released PyTorch backbones (transformers CLIP and LLaMA, a timm ConvNeXt
state dict) imported into the assembled tiny UniRES++, which then runs (needs the `torch` extra)."""

import numpy as np
import timm
import torch
import transformers
from flax import nnx

from unires_jax import models
from unires_jax.config_lib import load_config
from unires_jax.convert import clip_vit
from unires_jax.convert import convnext
from unires_jax.convert import llama
from unires_jax.models.synthetic import synthetic_batch


def test_pytorch_backbones_import_into_the_assembled_model(tmp_path):
  """The README's import recipe on the tiny config: all three backbones, then a forward pass."""
  config = load_config("tiny")
  m = config.model
  torch.manual_seed(0)
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      image_size=m.vision.image_size, patch_size=m.vision.patch_size,
      hidden_size=m.vision.hidden_size, intermediate_size=m.vision.intermediate_size,
      num_hidden_layers=m.vision.num_layers, num_attention_heads=m.vision.num_heads,
  )).save_pretrained(tmp_path / "clip")
  torch.save(timm.models.convnext.ConvNeXt(depths=m.convnext.depths, dims=m.convnext.dims)
             .state_dict(), tmp_path / "convnext.pth")
  hf_llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=m.llm.vocab_size, hidden_size=m.llm.hidden_size,
      intermediate_size=m.llm.intermediate_size, num_hidden_layers=m.llm.num_layers,
      num_attention_heads=m.llm.num_heads, num_key_value_heads=m.llm.num_kv_heads,
      head_dim=m.llm.head_dim, rms_norm_eps=m.llm.rms_norm_eps, rope_theta=m.llm.rope_theta,
      max_position_embeddings=m.llm.max_position_embeddings))
  hf_llama.save_pretrained(tmp_path / "llm")

  model = models.build_model(config, nnx.Rngs(0))
  added_rows = np.asarray(model.llm.model.embed_tokens.embedding[m.llm.vocab_size:])
  clip_vit.load_clip_vision(model.vision, str(tmp_path / "clip"), m.vision)
  convnext.load_convnext(model.convnext, str(tmp_path / "convnext.pth"))
  llama.load_llama(model.llm, str(tmp_path / "llm"))

  embedding = np.asarray(model.llm.model.embed_tokens.embedding[...])
  np.testing.assert_array_equal(
      embedding[:m.llm.vocab_size], hf_llama.model.embed_tokens.weight.detach().numpy())
  np.testing.assert_array_equal(embedding[m.llm.vocab_size:], added_rows)
  out = nnx.jit(lambda model, b: model(b))(model, synthetic_batch(m, 1))
  assert np.isfinite(np.asarray(out.mask_logits)).all()
