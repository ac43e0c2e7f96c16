"""Writes scenes in the MRES-32M raw layout (documented in tfds_builders/mres32m/README.md).

  RAW/<split>-<i:05d>-of-<n:05d>.jsonl    one image per line: objects with parts, COCO compressed
                                          RLE masks, captions per object and part, expressions
                                          with several or no targets, optional proposals
  RAW/images/<file_name>                  JPEG

A reference to one segment becomes captions on that object or part (the builder then takes the
segment id as the reference id); references to several or no segments become top-level
"expressions" that keep their own reference id.
"""

import json
import os

import numpy as np

from unires_jax import utils
from unires_jax.data.writers.common import Scene, Segment, write_jpeg


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.jsonl"


def rle(mask: np.ndarray) -> dict:
  """`[H, W]` mask -> `{"size": [H, W], "counts": str}`, COCO's compressed RLE as JSON holds it."""
  from pycocotools import mask as mask_utils  # Only the COCO-style writers need it.

  encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
  return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def _xywh(boxes) -> list[list[float]]:
  """`[n, 4]` x1, y1, x2, y2 -> x, y, w, h lists."""
  return [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
          for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4)]


def image_record(scene: Scene) -> dict:
  """The JSON object of one line: `scene` with its references split into captions/expressions."""
  h, w = scene.pixels.shape[:2]
  captions: dict[int, list[dict]] = {s.id: [] for s in scene.segments}
  expressions = []
  for ref in scene.refs:
    sentences = [{"id": i, "text": s} for s, i in zip(ref.sentences, ref.sent_ids)]
    if len(ref.segment_ids) == 1:
      captions[ref.segment_ids[0]].extend(sentences)
    else:
      expressions.extend({**s, "targets": list(ref.segment_ids), "ref_id": ref.ref_id}
                         for s in sentences)

  def segment(seg: Segment, **name) -> dict:
    return {"id": seg.id, **name, "bbox": seg.box_xywh, "mask": rle(seg.mask),
            "captions": captions[seg.id]}

  objects = []
  for obj in (s for s in scene.segments if s.part is None):
    parts = [segment(p, name=p.part) for p in scene.segments if p.parent == obj.id]
    objects.append({**segment(obj, category=obj.category), "parts": parts})
  record = {"image_id": scene.image_id, "file_name": scene.file_name, "height": h, "width": w,
            "objects": objects}
  if expressions:
    record["expressions"] = expressions
  if scene.object_proposals is not None or scene.part_proposals is not None:
    record["proposals"] = {
        key: _xywh(boxes) for key, boxes in (("object_boxes", scene.object_proposals),
                                             ("part_boxes", scene.part_proposals))
        if boxes is not None}
  return record


def write(root: str, splits: dict[str, list[Scene]], num_shards: int | dict[str, int] = 1) -> None:
  """Writes `splits` ({"train": [scenes], ...}) under `root`, each split in `num_shards` files.

  Scenes go to shards in contiguous runs (`np.array_split`), so a shard may be empty when there
  are fewer scenes than shards; the builder accepts empty shards.
  """
  for split, scenes in splits.items():
    n = num_shards[split] if isinstance(num_shards, dict) else num_shards
    for scene in scenes:
      write_jpeg(os.path.join(root, "images", scene.file_name), scene.pixels)
    for index, chunk in enumerate(np.array_split(np.arange(len(scenes)), n)):
      lines = [json.dumps(image_record(scenes[i])) + "\n" for i in chunk]
      utils.write_atomic(os.path.join(root, shard_name(split, index, n)), "".join(lines).encode())
