"""A tiny checkpoint laid out like an `unires-demo` work directory, for the web demo's tests."""

import pytest
from flax import nnx

from unires_jax import checkpoint, models
from unires_jax.config_lib import load_config
from unires_jax.data import shapes_parts, tokenizer


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> str:
  """A converted checkpoint of the tiny model with the ShapesParts tokenizer and, as in a demo
  work directory, `raw/` with 3 held-out ShapesParts images (`raw/annotations/val.json`).

  Random weights, not trained: two training steps cost about two minutes of this test suite's
  CPU, and what the tests compare (the page against `unires-segment`, the batcher against the
  segmenter) does not depend on the weights. The no-target head's prior is lowered by 10 (as in
  tests/test_segment.py) so that the model answers "target" and its masks show.
  """
  root = tmp_path_factory.mktemp("serve")
  config = load_config("tiny")
  tok = str(root / "tokenizer")
  tokenizer.train_tokenizer(
      shapes_parts.vocabulary_texts() + [config.input.template, config.input.answer],
      config.model.llm.vocab_size, tok)
  model = models.build_model(config, nnx.Rngs(0))
  bias = model.no_target_head.fc2.bias
  bias.set_value(bias.get_value() - 10.0)
  run = root / "run"
  checkpoint.save_converted(nnx.state(model, nnx.Param), config, str(run), tokenizer_dir=tok)
  shapes_parts.write(str(run / "raw"), num_train=0, num_val=3, seed=0)
  return str(run)

