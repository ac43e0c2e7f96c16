"""In-memory scenes that the raw-layout writers turn into files, and random scenes for tests.

The writers (one module per raw layout) produce small directories in exactly the layout of the
released datasets, so that the builders are tested on real files, never on mocked reads.
"""

import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Segment:
  """One annotated region. `polygon` (flat x, y list) is what COCO-style writers store when set;
  `mask` is then its rasterisation as pycocotools decodes it."""

  id: int
  mask: np.ndarray  # [H, W] bool
  category: str  # object category name ("truck")
  part: str | None = None  # part name ("wheel") for a part, None for an object
  polygon: list[float] | None = None
  parent: int | None = None  # id of the object a part belongs to

  @property
  def box_xywh(self) -> list[float]:
    ys, xs = np.nonzero(self.mask)
    if not len(xs):
      return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


@dataclasses.dataclass
class Ref:
  """A reference: sentences that all refer to `segment_ids` (empty = to nothing)."""

  ref_id: int
  segment_ids: list[int]
  sentences: list[str]
  sent_ids: list[int]


@dataclasses.dataclass
class Scene:
  """An image with its segments, references and proposals (x1, y1, x2, y2 pixels)."""

  image_id: int
  file_name: str
  pixels: np.ndarray  # [H, W, 3] uint8
  segments: list[Segment]
  refs: list[Ref]
  object_proposals: np.ndarray | None = None  # [n, 4]
  part_proposals: np.ndarray | None = None

  def segment(self, segment_id: int) -> Segment:
    return next(s for s in self.segments if s.id == segment_id)


def write_jpeg(path: str, pixels: np.ndarray, quality: int = 95) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path, format="JPEG", quality=quality)


def write_png(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")


def polygon_mask(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
  """The mask of a polygon as pycocotools rasterises it (what a COCO reader will see)."""
  from pycocotools import mask as mask_utils

  rle = mask_utils.frPyObjects([list(map(float, polygon))], height, width)
  return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def random_scene(rng: np.random.Generator, image_id: int, *, height: int = 48, width: int = 64,
                 num_objects: int = 3, first_segment_id: int = 1, first_ref_id: int = 0,
                 first_sent_id: int = 0, with_parts: bool = True, multi_and_none: bool = False,
                 file_name: str | None = None) -> Scene:
  """A random scene: triangles/quads as objects (with a polygon), each with one part (its top half),
  two sentences per reference. `multi_and_none` adds a two-object and a no-target reference."""
  pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
  segments, refs = [], []
  seg_id, ref_id, sent_id = first_segment_id, first_ref_id, first_sent_id

  def add_ref(ids, words):
    nonlocal ref_id, sent_id
    refs.append(Ref(ref_id, list(ids), [f"{words} {k}" for k in ("left", "right")],
                    [sent_id, sent_id + 1]))
    ref_id += 1
    sent_id += 2

  for k in range(num_objects):
    cx, cy = rng.uniform(8, width - 8), rng.uniform(8, height - 8)
    n = int(rng.integers(3, 6))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(4, 12, n)
    polygon = np.stack([np.clip(cx + radius * np.cos(angles), 0, width - 1),
                        np.clip(cy + radius * np.sin(angles), 0, height - 1)], 1)
    flat = [round(float(v), 2) for v in polygon.reshape(-1)]
    mask = polygon_mask(flat, height, width)
    if not mask.any():
      mask[int(cy), int(cx)] = True
    obj = Segment(seg_id, mask, category=f"thing{k % 2}", polygon=flat)
    segments.append(obj)
    seg_id += 1
    add_ref([obj.id], f"object {k}")
    if with_parts:
      ys = np.nonzero(mask)[0]
      part_mask = mask & (np.arange(height)[:, None] <= (ys.min() + ys.max()) // 2)
      part = Segment(seg_id, part_mask, category=obj.category, part="top", parent=obj.id)
      segments.append(part)
      seg_id += 1
      add_ref([part.id], f"top of object {k}")
  if multi_and_none:
    objects = [s.id for s in segments if s.part is None]
    add_ref(objects[:2], "two objects")
    add_ref([], "the unicorn")
  boxes = np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]]
                    for b in (s.box_xywh for s in segments)], np.float32).reshape(-1, 4)
  is_part = np.array([s.part is not None for s in segments], bool)
  return Scene(image_id, file_name or f"COCO_train2014_{image_id:012d}.jpg", pixels, segments,
               refs, object_proposals=boxes[~is_part], part_proposals=boxes[is_part])
