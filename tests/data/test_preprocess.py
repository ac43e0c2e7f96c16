"""`preprocess`'s fast paths give exactly what the plain formulas give."""

import numpy as np
import pytest
from PIL import Image

from unires_jax.config_lib import load_config
from unires_jax.data import preprocess


def _plain_letterbox(image: np.ndarray, size: int, resample: int) -> np.ndarray:
  """`[H, W, ...]` -> `[size, size, ...]`: longer side resized to `size`, top-left, zero padded."""
  h, w = image.shape[:2]
  nh, nw = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
  out = np.zeros((size, size) + image.shape[2:], image.dtype)
  out[:nh, :nw] = np.asarray(Image.fromarray(image).resize((nw, nh), resample))
  return out


def _plain_normalized(image: np.ndarray, size: int) -> np.ndarray:
  """Bicubic letterbox, then `(x / 255 - mean) / std` in float32; the padding 0."""
  h, w = image.shape[:2]
  out = (_plain_letterbox(image, size, Image.BICUBIC).astype(np.float32) / 255.0
         - preprocess.CLIP_MEAN) / preprocess.CLIP_STD
  out[round(h * size / max(h, w)):] = 0.0
  out[:, round(w * size / max(h, w)):] = 0.0
  return out


def _image(h: int, w: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def test_normalisation_table_is_the_formula_for_every_value():
  # A 16x16 image holding each value 0..255 in each channel, at its own size (no resize).
  values = np.arange(256, dtype=np.uint8).reshape(16, 16)
  image = np.stack([values, values[::-1], values.T], axis=-1)
  expected = (image.astype(np.float32) / 255.0 - preprocess.CLIP_MEAN) / preprocess.CLIP_STD
  got = preprocess.letterbox_normalized(Image.fromarray(image), 16)
  assert got.dtype == np.float32
  assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("h, w, size", [(480, 640, 336), (640, 480, 768), (333, 500, 768),
                                        (17, 23, 64), (768, 768, 768), (1, 7, 32),
                                        (1, 1000, 336)])  # the last: 0.3 rows, all padding
def test_letterbox_normalized_is_the_plain_letterbox_then_formula(h, w, size):
  image = _image(h, w, seed=h * w)
  got = preprocess.letterbox_normalized(Image.fromarray(image), size)
  assert got.tobytes() == _plain_normalized(image, size).tobytes()


@pytest.mark.parametrize("h, w", [(480, 640), (333, 500), (1000, 200), (5, 3)])
def test_masks_are_each_letterboxed_nearest(h, w):
  rng = np.random.default_rng(h + w)
  masks = (rng.random((3, h, w, 1)) < 0.3).astype(np.uint8)
  expected = np.stack([_plain_letterbox(m[..., 0], 96, Image.NEAREST) != 0 for m in masks])
  for given in (masks, list(masks)):  # TFDS decodes a list; a stacked array works too
    got = preprocess.letterbox_masks(given, 96)
    assert got.dtype == bool and got.tobytes() == expected.tobytes()
  assert preprocess.letterbox_masks([], 96).shape == (0, 96, 96)


def test_expand_shares_the_union_of_the_same_targets():
  config = load_config("tiny")
  spec = preprocess.sample_spec(config.model, config.input)
  s = spec.high_size
  rng = np.random.default_rng(0)
  masks = (rng.random((3, s, s, 1)) < 0.5).astype(np.uint8)
  example = {
      "image": _image(s, s, seed=1),
      "targets": {"mask": masks},
      "proposals": {"object_boxes": np.zeros((0, 4), np.float32),
                    "part_boxes": np.zeros((0, 4), np.float32)},
      "expressions": {"text": [b"a", b"b", b"c", b"d"],
                      "target_indices": [np.array([0, 2]), np.array([1]), np.array([0, 2]),
                                         np.array([], np.int32)],
                      "granularity": [2, 0, 2, 3], "no_target": [False, False, False, True],
                      "id": [1, 2, 3, 4]}}
  samples = preprocess.expand(
      preprocess.prepare_image(example, spec, lambda texts: [[5] for _ in texts]), spec)
  m = masks[..., 0] != 0
  for sample, union in zip(samples, [m[0] | m[2], m[1], m[0] | m[2], np.zeros((s, s), bool)]):
    assert sample["masks"].dtype == np.float32
    np.testing.assert_array_equal(sample["masks"], union.astype(np.float32))
  assert samples[0]["masks"] is samples[2]["masks"]


def _spec(add_target_boxes: float, max_objects: int = 4, max_parts: int = 3):
  config = load_config("tiny")
  config.model.update(max_objects=max_objects, max_parts=max_parts)
  config.input.update(add_target_boxes=add_target_boxes, target_box_jitter=0.0)
  return preprocess.sample_spec(config.model, config.input)


_TARGETS = {"box": np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]], np.float32),
            "granularity": np.array([0, 0, 1])}
_STORED = {"object_boxes": np.array([[30, 30, 40, 40], [31, 31, 41, 41], [32, 32, 42, 42]],
                                    np.float32),
           "part_boxes": np.array([[50, 50, 55, 55]], np.float32)}


def _rows(boxes: np.ndarray) -> set[tuple[float, ...]]:
  return {tuple(b) for b in boxes.tolist()}


def test_target_boxes_join_stored_proposals_with_the_configured_probability():
  rng = np.random.default_rng(0)
  none = preprocess.with_target_boxes(_STORED, _TARGETS, _spec(0.0), 64, 64, rng)
  assert _rows(none["object_boxes"]) == _rows(_STORED["object_boxes"])
  assert _rows(none["part_boxes"]) == _rows(_STORED["part_boxes"])

  # Probability 1: every target's box, then the stored ones (best first) while slots remain.
  every = preprocess.with_target_boxes(_STORED, _TARGETS, _spec(1.0), 64, 64, rng)
  assert _rows(every["object_boxes"]) == _rows(np.concatenate(
      [_TARGETS["box"][:2], _STORED["object_boxes"][:2]]))
  assert _rows(every["part_boxes"]) == _rows(np.concatenate(
      [_TARGETS["box"][2:], _STORED["part_boxes"]]))

  # Shuffled: a target's box is not always in the first slot.
  firsts = {tuple(preprocess.with_target_boxes(_STORED, _TARGETS, _spec(1.0), 64, 64, rng)
                  ["object_boxes"][0]) for _ in range(20)}
  assert len(firsts) > 2

  # About half of 2000 target boxes at probability 0.5.
  spec = _spec(0.5, max_objects=16)
  added = sum(len(preprocess.with_target_boxes(_STORED, _TARGETS, spec, 64, 64, rng)
                  ["object_boxes"]) - 3 for _ in range(1000))
  assert 900 < added < 1100


def test_add_target_boxes_out_of_range_is_refused():
  with pytest.raises(ValueError, match=r"config.input.add_target_boxes=1.5 must lie in \[0, 1\]"):
    _spec(1.5)


def test_answer_longer_than_its_room_is_refused():
  """Training takes the LM logits at `max_answer_tokens` positions: a longer answer would lose
  targets silently, so preprocessing refuses it, naming both fields."""
  config = load_config("tiny")
  config.model.max_answer_tokens = 3
  spec = preprocess.sample_spec(config.model, config.input)
  assert spec.max_length == preprocess.sample_spec(load_config("tiny").model,
                                                   config.input).max_length - 13
  s = spec.high_size
  example = {
      "image": _image(s, s, seed=1),
      "targets": {"mask": np.zeros((1, s, s, 1), np.uint8)},
      "proposals": {"object_boxes": np.zeros((0, 4), np.float32),
                    "part_boxes": np.zeros((0, 4), np.float32)},
      "expressions": {"text": [b"a"], "target_indices": [np.array([0])], "granularity": [0],
                      "no_target": [False], "id": [1]}}
  with pytest.raises(ValueError, match=r"config.input.answer .* is 4 tokens with \[SEG\], more "
                     r"than config.model.max_answer_tokens=3"):
    preprocess.prepare_image(example, spec, lambda texts: [[5, 6, 7] for _ in texts])
