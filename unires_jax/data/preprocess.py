"""NumPy preprocessing from a decoded schema example to the model's samples.

An image is prepared once (`prepare_image`: resizes, masks, proposals, tokenized prompts) and then
expanded into one sample per expression (`expand`), so datasets with many expressions per image
decode and resize each image once.

Geometry: both views are letterboxed, aspect kept: the longer side is resized to the view's size
and the image sits in the top-left corner, padded bottom/right with the normalisation mean (0 after
normalising). A pixel (x, y) of the original image maps to (x * scale, y * scale) with
`scale = size / max(height, width)`, so boxes are scaled and never shifted.
"""

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from unires_jax.models import prompt

# CLIP's normalisation, also used by the CLIP ConvNeXt (open_clip) tower.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """The static shapes of a sample; from `config.model` and `config.input`."""

  low_size: int  # CLIP view (model.vision.image_size)
  high_size: int  # ConvNeXt view and masks (model.convnext.image_size)
  num_image_tokens: int
  max_objects: int
  max_parts: int
  max_prompt_tokens: int
  max_answer_tokens: int
  special: prompt.SpecialTokens
  vocab_size: int  # base vocabulary; token ids must stay below it
  template: str  # prompt with "{expression}"
  answer: str  # answer text; [SEG] is appended as an id
  # Datasets without stored proposals (RefCOCO, gRefCOCO) get the boxes of the image's targets,
  # each side moved by up to this fraction of the box size, as a detector's would be (training).
  target_box_jitter: float | None = None
  # Datasets with stored proposals (a detector's, `unires-propose`): each target's box, jittered
  # as above, joins them with this probability (training), so that the no-target head sees
  # images whose referent the detector missed and images where a box holds it.
  add_target_boxes: float = 0.0

  @property
  def max_length(self) -> int:
    return (prompt.visual_prefix_length(self.num_image_tokens, self.max_objects, self.max_parts)
            + self.max_prompt_tokens + self.max_answer_tokens)


def sample_spec(model_cfg, input_cfg) -> SampleSpec:
  """`SampleSpec` for `config.model` and `config.input`."""
  if "{expression}" not in input_cfg.template:
    raise ValueError(f"config.input.template must hold '{{expression}}': {input_cfg.template!r}")
  return SampleSpec(
      low_size=model_cfg.vision.image_size, high_size=model_cfg.convnext.image_size,
      num_image_tokens=prompt.num_image_tokens(model_cfg.vision),
      max_objects=model_cfg.max_objects, max_parts=model_cfg.max_parts,
      max_prompt_tokens=input_cfg.max_prompt_tokens, max_answer_tokens=model_cfg.max_answer_tokens,
      special=prompt.SpecialTokens.appended_to(model_cfg.llm.vocab_size),
      vocab_size=model_cfg.llm.vocab_size, template=input_cfg.template,
      answer=input_cfg.answer, target_box_jitter=input_cfg.target_box_jitter,
      add_target_boxes=_probability(input_cfg.add_target_boxes, "config.input.add_target_boxes"))


def _probability(value: float, name: str) -> float:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name}={value} must lie in [0, 1]")
  return float(value)


# CLIP normalisation of every uint8 value, per channel: `[3, 256]`, the float32 arithmetic of
# `(value / 255 - mean) / std` done once, so that a lookup gives the formula's exact bits.
_NORMALIZED = ((np.arange(256, dtype=np.float32)[:, None] / 255.0 - CLIP_MEAN) / CLIP_STD).T.copy()


def _fitted_size(h: int, w: int, size: int) -> tuple[int, int]:
  """(height, width) with the longer side resized to `size`, aspect kept, at least 1 pixel."""
  scale = size / max(h, w)
  return max(1, round(h * scale)), max(1, round(w * scale))


def letterbox_normalized(image: Image.Image, size: int) -> np.ndarray:
  """RGB image -> `[size, size, 3]` float32: resized bicubic (longer side to `size`), top-left,
  CLIP-normalised; the padding is 0 (the normalised mean)."""
  h, w = image.height, image.width
  nh, nw = _fitted_size(h, w, size)
  resized = np.asarray(image.resize((nw, nh), resample=Image.BICUBIC))
  # The normalised region: a side under half a pixel rounds to 0 and is all padding, though the
  # resize makes it 1 pixel.
  vh, vw = round(h * size / max(h, w)), round(w * size / max(h, w))
  out = np.zeros((size, size, 3), np.float32)
  for c in range(3):
    out[:vh, :vw, c] = _NORMALIZED[c].take(resized[:vh, :vw, c])
  return out


def letterbox_masks(masks: Sequence[np.ndarray] | np.ndarray, size: int) -> np.ndarray:
  """`[n, H, W, 1]` uint8 (array or list) -> `[n, size, size]` bool: each resized nearest
  (longer side to `size`), top-left, padded with False."""
  out = np.zeros((len(masks), size, size), bool)
  for i, mask in enumerate(masks):
    mask = np.asarray(mask)[..., 0]
    nh, nw = _fitted_size(*mask.shape, size)
    out[i, :nh, :nw] = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST)) != 0
  return out


def _fixed_boxes(boxes: np.ndarray, scale: float, n: int) -> tuple[np.ndarray, np.ndarray]:
  """`[k, 4]` -> (`[n, 4]` scaled and zero-padded, `[n]` valid); the first `n` are kept."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[:n] * scale
  out = np.zeros((n, 4), np.float32)
  out[:len(boxes)] = boxes
  return out, np.arange(n) < len(boxes)


def proposals_from_targets(targets: dict[str, Any], jitter: float, height: int, width: int,
                           rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Object and part proposals from the targets' boxes, jittered, in random order.

  Args:
    targets: the example's `targets` (`box [n, 4]` x1, y1, x2, y2; `granularity` 0 object, 1 part).
    jitter: each side moves by up to `jitter * (box width or height)`.
    height, width: the image size (boxes are clipped to it).
    rng: the source of the jitter and of the order.

  Returns:
    {"object_boxes": [n_obj, 4], "part_boxes": [n_part, 4]} float32.
  """
  boxes = np.asarray(targets["box"], np.float32).reshape(-1, 4)
  size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
  moved = boxes + rng.uniform(-jitter, jitter, boxes.shape).astype(np.float32) * size
  moved = np.clip(moved, 0, [width, height, width, height]).astype(np.float32)
  moved[:, 2:] = np.maximum(moved[:, 2:], moved[:, :2])
  is_part = np.asarray(targets["granularity"], np.int64).reshape(-1) == 1
  return {"object_boxes": rng.permutation(moved[~is_part]),
          "part_boxes": rng.permutation(moved[is_part])}


def with_target_boxes(stored: dict[str, np.ndarray], targets: dict[str, Any], spec: SampleSpec,
                      height: int, width: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Stored proposals with each target's box added with probability `spec.add_target_boxes`
  (jittered by `spec.target_box_jitter`, 0 when None).

  The added boxes come first, the stored ones (best first) fill the remaining slots
  (`max_objects`, `max_parts`), and the kept boxes are shuffled, so that no slot tells a target's
  box from a detector's.

  Returns:
    {"object_boxes": [<= max_objects, 4], "part_boxes": [<= max_parts, 4]} float32.
  """
  added = proposals_from_targets(targets, spec.target_box_jitter or 0.0, height, width, rng)
  out = {}
  for key, limit in (("object_boxes", spec.max_objects), ("part_boxes", spec.max_parts)):
    extra = added[key][rng.random(len(added[key])) < spec.add_target_boxes]
    kept = np.concatenate([extra, np.asarray(stored[key], np.float32).reshape(-1, 4)])[:limit]
    out[key] = rng.permutation(kept).astype(np.float32)
  return out


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def prepare_image(example: dict[str, Any], spec: SampleSpec,
                  tokenize: Callable[[list[str]], list[list[int]]],
                  extra: dict[str, Any] | None = None,
                  rng: np.random.Generator | None = None) -> dict[str, Any]:
  """Everything the samples of one image share.

  Args:
    example: a decoded schema example (`tfds.data_source` item; see `unires_jax.data.schema`).
    spec: static shapes.
    tokenize: texts -> token ids (no special tokens added).
    extra: per-image values copied into every sample (e.g. the dataset index).
    rng: for the target-box proposals of an example without stored proposals, or those added
      to stored ones (`spec.add_target_boxes`); None keeps the example's proposals as they are
      (evaluation).

  Returns:
    a dict with `image_low [low, low, 3]`, `image_high [high, high, 3]` float32,
    `target_masks [n_targets, high, high]` bool, proposals, and per-expression lists.
  """
  image = Image.fromarray(np.asarray(example["image"]))
  h, w = image.height, image.width
  scale = spec.high_size / max(h, w)
  targets = example["targets"]
  proposals = example["proposals"]
  stored = len(proposals["object_boxes"]) + len(proposals["part_boxes"])
  if not stored and rng is not None and spec.target_box_jitter is not None:
    proposals = proposals_from_targets(targets, spec.target_box_jitter, h, w, rng)
  elif stored and rng is not None and spec.add_target_boxes > 0:
    proposals = with_target_boxes(proposals, targets, spec, h, w, rng)
  object_boxes, object_valid = _fixed_boxes(proposals["object_boxes"], scale, spec.max_objects)
  part_boxes, part_valid = _fixed_boxes(proposals["part_boxes"], scale, spec.max_parts)
  exprs = example["expressions"]
  texts = [_text(t) for t in exprs["text"]]
  prompts = tokenize([spec.template.format(expression=t) for t in texts])
  answer = tokenize([spec.answer])[0] + [spec.special.seg]
  if len(answer) > spec.max_answer_tokens:
    raise ValueError(f"config.input.answer {spec.answer!r} is {len(answer)} tokens with [SEG], "
                     f"more than config.model.max_answer_tokens={spec.max_answer_tokens}")
  for text, ids in zip(texts, prompts):
    if ids and max(ids) >= spec.vocab_size:
      raise ValueError(f"the tokenizer gave id {max(ids)} for {text!r}, outside the model's base "
                       f"vocabulary of {spec.vocab_size} (config.model.llm.vocab_size)")
  return {
      "image_low": letterbox_normalized(image, spec.low_size),
      "image_high": letterbox_normalized(image, spec.high_size),
      "target_masks": letterbox_masks(targets["mask"], spec.high_size),
      "object_boxes": object_boxes, "object_valid": object_valid,
      "part_boxes": part_boxes, "part_valid": part_valid,
      "num_objects": int(object_valid.sum()), "num_parts": int(part_valid.sum()),
      "prompts": [ids[:spec.max_prompt_tokens] for ids in prompts],
      "prompt_cut": [len(ids) > spec.max_prompt_tokens for ids in prompts],
      "answer": answer,
      "target_indices": [np.asarray(t, np.int64) for t in exprs["target_indices"]],
      "granularity": [int(g) for g in exprs["granularity"]],
      "no_target": [bool(n) for n in exprs["no_target"]],
      "expression_id": [int(i) for i in exprs["id"]],
      "original_size": np.array([h, w], np.int32),
      "scale": np.float32(scale),
      "extra": dict(extra or {}),
  }


def _union(target_masks: np.ndarray, indices: tuple[int, ...], size: int) -> np.ndarray:
  """`[n, size, size]` bool -> `[size, size]` float32: 1 where any of the `indices` is."""
  if not indices:
    return np.zeros((size, size), np.float32)
  return target_masks[list(indices)].any(axis=0).astype(np.float32)


def expand(prepared: dict[str, Any], spec: SampleSpec) -> list[dict[str, Any]]:
  """One model sample per expression of a prepared image.

  Each sample holds the batch fields of `unires_jax.models.unires` (`image_low`, `image_high`,
  `object_boxes [max_objects, 4]`, `object_valid`, `part_boxes`, `part_valid`, `input_ids
  [max_length]`, `attention_mask`, `loss_mask`, `masks [high, high]` float32 union of the targets,
  `no_target`) and, for evaluation, `granularity` (index into `schema.GRANULARITIES`),
  `expression_id`, `original_size [2]` (height, width), `scale`, and `valid` (1; 0 marks padding).
  The image arrays are shared between the samples of one image, not copied, and so is the mask of
  expressions with the same targets.
  """
  unions = {}  # target indices -> their mask
  samples = []
  for k, prompt_ids in enumerate(prepared["prompts"]):
    indices = tuple(prepared["target_indices"][k])
    if indices not in unions:
      unions[indices] = _union(prepared["target_masks"], indices, spec.high_size)
    seq = prompt.build_sequence(
        prompt_ids, prepared["answer"], special=spec.special,
        num_image_tokens=spec.num_image_tokens, num_objects=prepared["num_objects"],
        num_parts=prepared["num_parts"], max_objects=spec.max_objects,
        max_parts=spec.max_parts, max_length=spec.max_length)
    samples.append({
        "image_low": prepared["image_low"], "image_high": prepared["image_high"],
        "object_boxes": prepared["object_boxes"], "object_valid": prepared["object_valid"],
        "part_boxes": prepared["part_boxes"], "part_valid": prepared["part_valid"],
        **seq,
        "masks": unions[indices],
        "no_target": np.bool_(prepared["no_target"][k]),
        "granularity": np.int32(prepared["granularity"][k]),
        "expression_id": np.int64(prepared["expression_id"][k]),
        "original_size": prepared["original_size"],
        "scale": prepared["scale"],
        "valid": np.int32(1),
        **{key: np.asarray(v) for key, v in prepared["extra"].items()},
    })
  return samples


def padding_like(sample: dict[str, Any]) -> dict[str, Any]:
  """A sample of zeros with `valid = 0`, to fill the last evaluation batch to full size.

  Its sequence still holds one [SEG] (copied from `sample`) so the model runs on it unchanged.
  """
  pad = {k: np.zeros_like(v) for k, v in sample.items()}
  for key in ("input_ids", "attention_mask"):
    pad[key] = sample[key]
  return pad

