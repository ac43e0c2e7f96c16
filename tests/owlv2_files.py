"""A random-weight tiny OWLv2 detector directory, as transformers' `save_pretrained` writes the
released ones (config.json, model.safetensors, a CLIP tokenizer), for tests of the proposal
tools."""

import json
import os


def _byte_chars() -> list[str]:
  """CLIP's byte-level alphabet: one printable character per byte value (bytes_to_unicode)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  extra = [b for b in range(256) if b not in printable]
  return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def tokenizer_vocab() -> dict[str, int]:
  """A CLIP vocabulary without merges: every byte alone and as a word end, then the start and
  end tokens (the largest id, where OWLv2's text tower pools). 514 entries."""
  chars = _byte_chars()
  words = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
  return {w: i for i, w in enumerate(words)}


def hf_config(cfg, eos_token_id: int):
  """The `transformers.Owlv2Config` of our config `cfg` (`unires_jax.models.owlv2`); the text
  tower's start and end tokens are `eos_token_id - 1` and `eos_token_id`."""
  import transformers  # pylint: disable=g-import-not-at-top

  tower = lambda c: dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act)
  return transformers.Owlv2Config(
      vision_config=dict(image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size,
                         num_channels=cfg.vision.num_channels, **tower(cfg.vision)),
      text_config=dict(vocab_size=cfg.text.vocab_size, bos_token_id=eos_token_id - 1,
                       eos_token_id=eos_token_id,
                       max_position_embeddings=cfg.text.max_position_embeddings,
                       **tower(cfg.text)),
      projection_dim=cfg.projection_dim)


def write_tiny_detector(path: str, seed: int = 0, image_size: int = 32) -> str:
  """Writes a tiny `Owlv2ForObjectDetection` (random weights, `seed`) with its tokenizer to
  `path`; returns `path`. Queries are one token per character, 16 at most."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  vocab = tokenizer_vocab()
  tower = dict(num_hidden_layers=2, num_attention_heads=2, layer_norm_eps=1e-5,
               hidden_act="quick_gelu")
  config = transformers.Owlv2Config(
      vision_config=dict(image_size=image_size, patch_size=8, num_channels=3, hidden_size=32,
                         intermediate_size=64, **tower),
      text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, hidden_size=24,
                       intermediate_size=48, bos_token_id=len(vocab) - 2,
                       eos_token_id=len(vocab) - 1, **tower),
      projection_dim=24)
  torch.manual_seed(seed)
  model = transformers.Owlv2ForObjectDetection(config)
  # transformers draws the heads' matrices with std 1, which saturates the tiny model's boxes
  # and scores (every box a line at the image's edge): matrices with std 1 / sqrt(fan_in).
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
  model.save_pretrained(path)
  transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token="!").save_pretrained(path)
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["text_config"]["vocab_size"] == len(vocab)
  return path
