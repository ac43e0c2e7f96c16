"""Granularity-aware token sequences: where image, object and part features enter the LLM.

A UniRES++ sequence is

  <img> <img_patch> x N_img </img>
  ( <obj> <obj_patch> </obj> ) x max_objects
  ( <part> <part_patch> </part> ) x max_parts
  prompt tokens   answer tokens (holding exactly one [SEG])   padding

The model replaces the embedding of every `*_patch` placeholder by a projected visual feature: the
CLIP patch tokens for `<img_patch>`, RoIAlign features of the object / part proposals for
`<obj_patch>` / `<part_patch>`. Object and part slots are always `max_objects` / `max_parts` long
so that shapes are static; the slots of absent proposals are padding (attention mask 0). The LM
loss covers the answer tokens; the [SEG] token's final hidden state is the mask query.
"""

import dataclasses
from typing import Sequence

import numpy as np

# The order in which the special tokens are appended to the base vocabulary.
SPECIAL_TOKEN_FIELDS = (
    "image_start", "image_end", "image_patch",
    "object_start", "object_end", "object_patch",
    "part_start", "part_end", "part_patch",
    "seg",
)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the special tokens (field names as in `config.model.special_tokens`)."""

  image_start: int
  image_end: int
  image_patch: int
  object_start: int
  object_end: int
  object_patch: int
  part_start: int
  part_end: int
  part_patch: int
  seg: int

  @classmethod
  def appended_to(cls, base_vocab_size: int) -> "SpecialTokens":
    """Ids when the special tokens are the rows after a base vocabulary of that size."""
    return cls(**{f: base_vocab_size + i for i, f in enumerate(SPECIAL_TOKEN_FIELDS)})

  @classmethod
  def from_tokenizer(cls, tokenizer, strings) -> "SpecialTokens":
    """Adds the token `strings` (config.model.special_tokens) to a `transformers` tokenizer.

    The tokens are added in SPECIAL_TOKEN_FIELDS order, so for a tokenizer of `n` base tokens the
    ids equal `appended_to(n)`.
    """
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [strings[f] for f in SPECIAL_TOKEN_FIELDS]})
    return cls(**{f: tokenizer.convert_tokens_to_ids(strings[f]) for f in SPECIAL_TOKEN_FIELDS})


def num_special_tokens() -> int:
  return len(SPECIAL_TOKEN_FIELDS)


def num_image_tokens(vision_cfg) -> int:
  """`<img_patch>` placeholders per sequence (`config.model.vision`): CLIP's patch grid at the
  configured image size, plus the CLS token when `select_feature` is "cls_patch"."""
  grid = vision_cfg.image_size // vision_cfg.patch_size
  return grid * grid + int(vision_cfg.select_feature == "cls_patch")


def visual_prefix_length(num_image: int, max_objects: int, max_parts: int) -> int:
  """Tokens before the prompt: `<img>`, the image tokens, `</img>`, and 3 per region slot."""
  return num_image + 2 + 3 * (max_objects + max_parts)


def build_sequence(
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    *,
    special: SpecialTokens,
    num_image_tokens: int,
    num_objects: int,
    num_parts: int,
    max_objects: int,
    max_parts: int,
    max_length: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
  """One training sequence; see the module docstring for the layout.

  Args:
    prompt_ids: tokenized instruction and expression.
    answer_ids: tokenized answer; must hold exactly one `special.seg`.
    special: ids of the special tokens.
    num_image_tokens: number of CLIP feature tokens (`<img_patch>` placeholders).
    num_objects, num_parts: proposals present (the rest of the `max_*` slots is padding).
    max_objects, max_parts: slots in the sequence.
    max_length: total length after padding on the right.
    pad_id: id used for padding (masked out, never a target).

  Returns:
    `input_ids [max_length]` int32, `attention_mask [max_length]` int32 (1 = attend),
    `loss_mask [max_length]` int32 (1 where the token is an LM target: the answer tokens).
  """
  seg_count = sum(1 for t in answer_ids if t == special.seg)
  if seg_count != 1:
    raise ValueError(
        f"answer_ids must hold exactly one [SEG] token (id {special.seg}), found {seg_count}: "
        f"{list(answer_ids)}")
  if any(t == special.seg for t in prompt_ids):
    raise ValueError("prompt_ids must not hold the [SEG] token; it belongs in the answer")
  if not 0 <= num_objects <= max_objects:
    raise ValueError(f"num_objects={num_objects} outside [0, max_objects={max_objects}]")
  if not 0 <= num_parts <= max_parts:
    raise ValueError(f"num_parts={num_parts} outside [0, max_parts={max_parts}]")

  ids: list[int] = []
  attend: list[int] = []

  def add(tokens, visible=True):
    ids.extend(tokens)
    attend.extend([int(visible)] * len(tokens))

  add([special.image_start] + [special.image_patch] * num_image_tokens + [special.image_end])
  for i in range(max_objects):
    add([special.object_start, special.object_patch, special.object_end], i < num_objects)
  for i in range(max_parts):
    add([special.part_start, special.part_patch, special.part_end], i < num_parts)
  add(list(prompt_ids))
  answer_start = len(ids)
  add(list(answer_ids))
  if len(ids) > max_length:
    raise ValueError(f"sequence of {len(ids)} tokens exceeds max_length={max_length}")

  loss = np.zeros(max_length, np.int32)
  loss[answer_start:len(ids)] = 1
  pad = max_length - len(ids)
  return {
      "input_ids": np.asarray(ids + [pad_id] * pad, np.int32),
      "attention_mask": np.asarray(attend + [0] * pad, np.int32),
      "loss_mask": loss,
  }
