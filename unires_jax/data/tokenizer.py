"""A small word-level tokenizer trained offline, for the tiny demo model (base vocabulary 128).

Word level suits a tiny closed vocabulary: every word of the training texts is one token, so a
ShapesParts prompt stays a few tokens long and no seen word becomes `<unk>`. The demo tokenizer:

  texts = [*shapes_parts.vocabulary_texts(), *tokenizer.PROMPT_WORDS]
  tok = tokenizer.train_tokenizer(texts, vocab_size=128, out_dir="runs/demo/tokenizer")

The model's own special tokens (<img>, [SEG], ...) are rows appended after its base vocabulary
(`prompt.SpecialTokens.appended_to`), so they are not part of this vocabulary.
"""

import collections
import os
from typing import Callable, Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
import transformers

from unires_jax import utils

Tokenize = Callable[[list[str]], list[list[int]]]  # texts -> token ids, no special tokens added

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3

# The words of the pipeline's prompt, answer and no-target answer (config.input.template and
# .answer: "Please segment {expression} in this image.", "Sure, it is [SEG]").
PROMPT_WORDS = ("please segment the", "in this image", "sure", "it is", "there is no such target",
                ".", ",", "?")


def _empty_tokenizer(vocab: dict[str, int]) -> Tokenizer:
  """Word-level model over `vocab`: lowercased, split on whitespace and at punctuation."""
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words \w+ and runs of punctuation
  return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    out_dir: str) -> transformers.PreTrainedTokenizerFast:
  """Trains a word-level tokenizer on `texts`, saves it to `out_dir` and returns it.

  The vocabulary is `<pad>` (0), `<unk>`, `<s>`, `</s>`, then every distinct word of the texts,
  most frequent first (ties alphabetical, so the same texts give the same ids). Encoding adds no
  `<s>`/`</s>`; the pipeline places its own tokens. `out_dir` is replaced whole, through a
  temporary directory beside it and a rename, so a reader never sees half a tokenizer.

  Raises:
    ValueError: `vocab_size` is below the 4 special tokens, or the texts hold more distinct words
      than fit in `vocab_size` (the model's base vocabulary, config.model.llm.vocab_size).
  """
  if vocab_size < len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size} cannot hold the {len(SPECIAL_TOKENS)} special "
                     f"tokens {SPECIAL_TOKENS}")
  splitter = _empty_tokenizer({UNK: 0})  # its normaliser and pre-tokeniser give the words
  counts = collections.Counter(
      word for text in texts for word, _ in
      splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)))
  words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
           if w not in SPECIAL_TOKENS]
  if len(SPECIAL_TOKENS) + len(words) > vocab_size:
    raise ValueError(
        f"the texts hold {len(words)} distinct words; with the {len(SPECIAL_TOKENS)} special "
        f"tokens that is {len(words) + len(SPECIAL_TOKENS)} > vocab_size={vocab_size} "
        f"(least frequent: {words[-5:]})")
  vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=_empty_tokenizer(vocab), pad_token=PAD, unk_token=UNK, bos_token=BOS,
      eos_token=EOS)
  with utils.new_directory(out_dir, replace=True) as tmp:
    tokenizer.save_pretrained(tmp)
  return tokenizer


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer saved in directory `path` (by `train_tokenizer` or any `save_pretrained`)."""
  if not path:
    raise FileNotFoundError("no tokenizer directory given: set config.input.tokenizer to a "
                            "directory written by save_pretrained (nothing is downloaded)")
  if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
      os.path.join(path, "tokenizer_config.json")):
    raise FileNotFoundError(f"no tokenizer in {path!r}: expected a directory written by "
                            "save_pretrained (tokenizer.json, tokenizer_config.json)")
  return transformers.AutoTokenizer.from_pretrained(path)


def hf_tokenize(tokenizer: transformers.PreTrainedTokenizerBase) -> Tokenize:
  """A `transformers` tokenizer as `texts -> ids` without added special tokens."""

  def tokenize(texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]

  return tokenize


def load_tokenize(path: str) -> Tokenize:
  """`hf_tokenize` of the tokenizer saved in directory `path` (`config.input.tokenizer`)."""
  return hf_tokenize(load_tokenizer(path))
