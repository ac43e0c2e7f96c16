"""The offline word-level tokenizer: the demo vocabulary fits the tiny model, covers ShapesParts
and the pipeline's prompts, round-trips, saves atomically and loads with AutoTokenizer."""

import os

import pytest
import transformers

from unires_jax.config_lib import load_config
from unires_jax.data import shapes_parts
from unires_jax.data import tokenizer as tokenizer_lib

DEMO_TEXTS = [*shapes_parts.vocabulary_texts(), *tokenizer_lib.PROMPT_WORDS]


@pytest.fixture(scope="module")
def config():
  return load_config("configs/tiny.py")


@pytest.fixture(scope="module")
def sentences():
  scenes = shapes_parts.generate(300, seed=11)
  return sorted({s for scene in scenes for r in scene.refs for s in r.sentences})


@pytest.fixture
def demo(tmp_path, config):
  out = str(tmp_path / "tokenizer")
  return out, tokenizer_lib.train_tokenizer(DEMO_TEXTS, config.model.llm.vocab_size, out)


def test_fits_the_tiny_vocabulary_with_specials_first(demo, config):
  _, tok = demo
  assert len(tok) <= config.model.llm.vocab_size
  assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
  assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]


def test_no_unk_and_round_trip_on_shapes_parts(demo, sentences, config):
  _, tok = demo
  ids = tok(sentences, add_special_tokens=False)["input_ids"]
  for sentence, row in zip(sentences, ids):
    assert tok.unk_token_id not in row, sentence
    assert tok.decode(row) == sentence
  # The pipeline's prompt and answer (tokenizer.hf_tokenize adds no special tokens).
  prompts = [config.input.template.format(expression=s) for s in sentences[:50]]
  prompts.append(config.input.answer)
  for row in tok(prompts, add_special_tokens=False)["input_ids"]:
    assert tok.unk_token_id not in row and max(row) < config.model.llm.vocab_size


def test_lowercases_and_marks_unknown_words(demo):
  _, tok = demo
  assert tok("The RED Truck")["input_ids"] == tok("the red truck")["input_ids"]
  assert tok("the zebra")["input_ids"][1] == tok.unk_token_id
  assert tok("sure, it is.")["input_ids"] == tok("sure , it is .")["input_ids"]


def test_saved_directory_loads_with_auto_tokenizer(demo, sentences):
  out, tok = demo
  loaded = tokenizer_lib.load_tokenizer(out)
  direct = transformers.AutoTokenizer.from_pretrained(out)
  assert loaded.get_vocab() == tok.get_vocab() == direct.get_vocab()
  assert loaded.pad_token_id == 0
  assert loaded(sentences)["input_ids"] == tok(sentences)["input_ids"]


def test_deterministic_and_atomic_overwrite(tmp_path):
  out = tmp_path / "tok"
  tokenizer_lib.train_tokenizer(DEMO_TEXTS, 128, str(out))
  first = (out / "tokenizer.json").read_bytes()
  tokenizer_lib.train_tokenizer(list(reversed(DEMO_TEXTS)), 128, str(out))
  assert (out / "tokenizer.json").read_bytes() == first  # ties are broken alphabetically
  tokenizer_lib.train_tokenizer(["only two"], 128, str(out))
  assert len(tokenizer_lib.load_tokenizer(str(out))) == 6
  assert sorted(os.listdir(tmp_path)) == ["tok"]  # no temporary directory left behind


def test_vocabulary_too_small(tmp_path):
  words = " ".join(f"w{i}" for i in range(125))
  with pytest.raises(ValueError, match=r"125 distinct words.*129 > vocab_size=128"):
    tokenizer_lib.train_tokenizer([words], 128, str(tmp_path / "tok"))
  assert not (tmp_path / "tok").exists()
  assert len(tokenizer_lib.train_tokenizer([words], 129, str(tmp_path / "tok"))) == 129
  with pytest.raises(ValueError, match="special tokens"):
    tokenizer_lib.train_tokenizer(["a"], 3, str(tmp_path / "tok3"))


def test_load_missing_names_the_path(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    tokenizer_lib.load_tokenizer(missing)
