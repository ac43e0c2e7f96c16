"""The small ShapesParts dataset the training and serving tests share, and its config."""

import os

from unires_jax.config_lib import load_config
from unires_jax.data import build, shapes_parts, tokenizer

# The tiny model on that dataset: `load_config(f"{CONFIG}:{root}")`.
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train", "shapes_config.py")


def write_shapes_root(root: str) -> str:
  """Writes `root/raw/` (ShapesParts: 24 train, 8 val images), `root/tfds/` (built as
  ref_coco_m) and `root/tokenizer/`; returns `root`."""
  shapes_parts.write(os.path.join(root, "raw"), num_train=24, num_val=8, seed=0)
  build.prepare("ref_coco_m", manual_dir=os.path.join(root, "raw"),
                data_dir=os.path.join(root, "tfds"))
  config = load_config(CONFIG)
  tokenizer.train_tokenizer(
      shapes_parts.vocabulary_texts() + [config.input.template, config.input.answer],
      config.model.llm.vocab_size, os.path.join(root, "tokenizer"))
  return root
