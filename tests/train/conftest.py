"""A small ShapesParts dataset, built once per session, for the training tests."""

import os

import pytest

from unires_jax.config_lib import load_config
from unires_jax.data import build, shapes_parts, tokenizer

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_config.py")


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> str:
  """A folder with `raw/`, `tfds/` (ref_coco_m: 24 train, 8 val images) and `tokenizer/`."""
  root = tmp_path_factory.mktemp("shapes")
  shapes_parts.write(str(root / "raw"), num_train=24, num_val=8, seed=0)
  build.prepare("ref_coco_m", manual_dir=str(root / "raw"), data_dir=str(root / "tfds"))
  config = load_config(CONFIG)
  tokenizer.train_tokenizer(
      shapes_parts.vocabulary_texts() + [config.input.template, config.input.answer],
      config.model.llm.vocab_size, str(root / "tokenizer"))
  return str(root)
