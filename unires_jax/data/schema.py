"""The one feature schema that every UniRES++ TFDS builder writes (one example per image).

An example holds an image once with all of its references, so that datasets with many expressions
per image (MRES-32M: ~32) do not store the image once per expression:

  image                 encoded JPEG as in the raw data (bytes kept; grayscale/CMYK stored as
                        lossless PNG of the RGB pixels)                         [H, W, 3] uint8
  image_id              the raw dataset's image id, as text
  file_name             the raw image file name
  targets               every segment that at least one expression refers to:
    id                  raw annotation / segment id (int64)
    mask                PNG, values {0, 1}                                       [H, W, 1] uint8
    box                 x1, y1, x2, y2 in image pixels                           [4] float32
    category            category name ("person"; a part: "person:head")
    granularity         "object" | "part"
    raw                 JSON of the raw annotation's other fields (nothing the raw file has is lost)
  expressions           one per referring sentence:
    text                the sentence
    id                  raw sentence id
    ref_id              raw reference id (several sentences share a reference)
    target_indices      indices into `targets`; empty = no target                [n] int32
    granularity         "object" | "part" | "multi" | "none"
    no_target           True when the expression refers to nothing
  proposals             region proposals, possibly empty:
    object_boxes        x1, y1, x2, y2 pixels                                    [n_obj, 4] float32
    part_boxes          x1, y1, x2, y2 pixels                                    [n_part, 4] float32

Masks are PNG (not RLE) so that `tfds.data_source` decodes them with nothing but
`tensorflow_datasets` installed. The input pipeline (`unires_jax.data.pipeline`) expands an image
into one sample per expression; evaluation counts expressions.
"""

import dataclasses
import io
import json
from typing import Any, Sequence

import numpy as np
from PIL import Image

from unires_jax.data.records import RecordError

TARGET_GRANULARITIES = ("object", "part")
GRANULARITIES = ("object", "part", "multi", "none")


def features():
  """The `tfds.features.FeaturesDict` of the schema above."""
  import tensorflow_datasets as tfds  # Only builders need it; the pipeline reads NumPy.

  box = tfds.features.Tensor(shape=(4,), dtype=np.float32)
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=None),
      "image_id": tfds.features.Text(),
      "file_name": tfds.features.Text(),
      "targets": tfds.features.Sequence({
          "id": np.int64,
          "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "box": box,
          "category": tfds.features.Text(),
          "granularity": tfds.features.ClassLabel(names=TARGET_GRANULARITIES),
          "raw": tfds.features.Text(),
      }),
      "expressions": tfds.features.Sequence({
          "text": tfds.features.Text(),
          "id": np.int64,
          "ref_id": np.int64,
          "target_indices": tfds.features.Sequence(np.int32),
          "granularity": tfds.features.ClassLabel(names=GRANULARITIES),
          "no_target": np.bool_,
      }),
      "proposals": {
          "object_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
          "part_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      },
  })


@dataclasses.dataclass
class Target:
  """A segment referred to by at least one expression."""

  id: int
  mask: np.ndarray  # [H, W] bool or {0, 1} / {0, 255} integers
  box: Sequence[float]  # x1, y1, x2, y2 pixels
  category: str
  granularity: str  # "object" | "part"
  raw: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Expression:
  """One referring sentence; `targets` indexes `ImageRecord.targets`."""

  text: Any  # validated to be a non-empty str
  id: int
  ref_id: int
  targets: Sequence[int]


@dataclasses.dataclass
class ImageRecord:
  """Everything one image contributes, before encoding; `where` names its raw source in errors."""

  where: str
  image_id: str
  file_name: str
  image: bytes | np.ndarray  # encoded JPEG/PNG bytes, or [H, W, 3] uint8
  height: int
  width: int
  targets: list[Target]
  expressions: list[Expression]
  object_proposals: np.ndarray | None = None  # [n, 4] x1, y1, x2, y2
  part_proposals: np.ndarray | None = None


def expression_granularity(targets: Sequence[Target], indices: Sequence[int]) -> str:
  """"none" for no target, "multi" for several, else the single target's own granularity."""
  if not indices:
    return "none"
  if len(indices) > 1:
    return "multi"
  return targets[indices[0]].granularity


def encode_mask(mask: np.ndarray) -> bytes:
  """`[H, W]` mask (nonzero = inside) -> PNG bytes of a {0, 1} single-channel image."""
  buf = io.BytesIO()
  Image.fromarray((np.asarray(mask) != 0).astype(np.uint8), mode="L").save(buf, format="PNG")
  return buf.getvalue()


def check_box(box, height: int, width: int, where: str, what: str) -> np.ndarray:
  """`box` (x1, y1, x2, y2 pixels) as `[4]` float32, or a RecordError at `where` naming `what`
  when it is not 4 finite numbers inside the `width` x `height` image."""
  b = np.asarray(box, np.float64).reshape(-1)
  if b.shape != (4,) or not np.all(np.isfinite(b)):
    raise RecordError(where, f"{what}: a box is 4 finite numbers x1, y1, x2, y2, got {box!r}")
  x1, y1, x2, y2 = b
  # Half a pixel of slack: COCO boxes are float and sometimes end at width + 0.5.
  if not (-0.5 <= x1 <= x2 <= width + 0.5 and -0.5 <= y1 <= y2 <= height + 0.5):
    raise RecordError(
        where, f"{what}: box {[float(v) for v in b]} lies outside the {width}x{height} image")
  return b.astype(np.float32)


def _boxes(boxes, height, width, where, what) -> np.ndarray:
  if boxes is None:
    return np.zeros((0, 4), np.float32)
  rows = [check_box(b, height, width, where, f"{what}[{i}]") for i, b in enumerate(boxes)]
  return np.stack(rows) if rows else np.zeros((0, 4), np.float32)


def to_example(record: ImageRecord) -> dict[str, Any]:
  """Validates `record` and returns the feature dict of the schema (see the module docstring).

  Raises:
    RecordError: naming `record.where` and the field: empty or non-string expression, mask size
      differing from the image, box outside the image, target index out of range.
  """
  where, h, w = record.where, record.height, record.width
  targets = []
  for i, t in enumerate(record.targets):
    what = f"target {t.id}"
    mask = np.asarray(t.mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
      mask = mask[..., 0]
    if mask.shape != (h, w):
      raise RecordError(where, f"{what}: mask of shape {mask.shape} differs from the image's "
                        f"{(h, w)} (height, width)")
    if t.granularity not in TARGET_GRANULARITIES:
      raise RecordError(where, f"{what}: granularity {t.granularity!r} not in "
                        f"{TARGET_GRANULARITIES}")
    targets.append({
        "id": int(t.id),
        "mask": encode_mask(mask),
        "box": check_box(t.box, h, w, where, what),
        "category": str(t.category),
        "granularity": t.granularity,
        "raw": json.dumps(t.raw, sort_keys=True, default=str),
    })
  expressions = []
  for e in record.expressions:
    what = f"sentence {e.id}"
    if not isinstance(e.text, str) or not e.text.strip():
      raise RecordError(where, f"{what}: expression must be a non-empty string, got {e.text!r}")
    bad = [j for j in e.targets if not 0 <= j < len(targets)]
    if bad:
      raise RecordError(where, f"{what}: target indices {bad} outside [0, {len(targets)})")
    expressions.append({
        "text": e.text.strip(),
        "id": int(e.id),
        "ref_id": int(e.ref_id),
        "target_indices": np.asarray(list(e.targets), np.int32),
        "granularity": expression_granularity(record.targets, list(e.targets)),
        "no_target": not e.targets,
    })
  if not expressions:
    raise RecordError(where, "image has no expression")
  return {
      "image": record.image,
      "image_id": str(record.image_id),
      "file_name": record.file_name,
      "targets": targets,
      "expressions": expressions,
      "proposals": {
          "object_boxes": _boxes(record.object_proposals, h, w, where, "object proposal"),
          "part_boxes": _boxes(record.part_proposals, h, w, where, "part proposal"),
      },
  }
