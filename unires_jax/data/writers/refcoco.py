"""Writes scenes in the refer-toolkit layout of RefCOCO / RefCOCO+ / RefCOCOg (lichengunc/refer).

  RAW/<dataset>/refs(<split_by>).p       Python 2-compatible pickle (protocol 2) of the refs list
  RAW/<dataset>/instances.json           COCO: images, annotations, categories
  RAW/images/train2014/<file_name>       JPEG

Documented field by field in tfds_builders/ref_coco/README.md. RefCOCO references name exactly one
object annotation, so scenes must come from `random_scene(..., with_parts=False)`.
"""

import itertools
import json
import os
import pickle

import numpy as np

from unires_jax import utils
from unires_jax.data.writers.common import (Scene, Segment, polygon_mask,
                                            write_jpeg)

# How an annotation's `segmentation` is written: COCO polygons, compressed RLE (counts a string,
# as pycocotools encodes it) or uncompressed RLE (counts a list of run lengths, as COCO stores
# crowd regions). "alternate" cycles through the three by annotation.
SEGMENTATIONS = ("polygon", "rle", "uncompressed_rle")


def uncompressed_rle(mask: np.ndarray) -> dict:
  """`[H, W]` bool -> COCO uncompressed RLE: run lengths in column-major order, zeros first."""
  flat = np.asarray(mask, bool).T.reshape(-1)
  counts = [len(list(run)) for _, run in itertools.groupby(flat)]
  if flat.size and flat[0]:
    counts = [0] + counts  # COCO counts always start with a (possibly empty) run of zeros.
  return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
  """`[H, W]` bool -> COCO compressed RLE with `counts` as text (what JSON can hold)."""
  from pycocotools import mask as mask_utils

  rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def segmentation(seg: Segment, kind: str):
  """The COCO `segmentation` of `seg` in `kind` (one of SEGMENTATIONS), decoding to `seg.mask`.

  A polygon is written only when pycocotools rasterises it to exactly `seg.mask` (random scenes
  patch a pixel into masks of degenerate polygons); otherwise compressed RLE is written.
  """
  h, w = seg.mask.shape
  if kind == "polygon" and seg.polygon is not None and np.array_equal(
      polygon_mask(seg.polygon, h, w), seg.mask):
    return [list(seg.polygon)]
  if kind == "uncompressed_rle":
    return uncompressed_rle(seg.mask)
  return compressed_rle(seg.mask)


def annotation(scene: Scene, seg: Segment, kind: str, category_ids: dict[str, int]) -> dict:
  """One COCO annotation of `seg` (area and bbox from its mask)."""
  seg_json = segmentation(seg, kind)
  return {"id": seg.id, "image_id": scene.image_id, "category_id": category_ids[seg.category],
          "segmentation": seg_json, "area": float(seg.mask.sum()), "bbox": seg.box_xywh,
          "iscrowd": int(isinstance(seg_json, dict))}  # COCO keeps RLE for crowd regions.


def instances(scenes: list[Scene], segmentation_kind: str = "alternate") -> dict:
  """The COCO `instances.json` content of `scenes` (every segment, referred to or not)."""
  names = sorted({s.category for scene in scenes for s in scene.segments})
  category_ids = {name: k + 1 for k, name in enumerate(names)}
  kinds = itertools.cycle(SEGMENTATIONS if segmentation_kind == "alternate"
                          else [segmentation_kind])
  images, annotations = [], []
  for scene in scenes:
    h, w = scene.pixels.shape[:2]
    images.append({"id": scene.image_id, "file_name": scene.file_name, "height": h, "width": w,
                   "license": 1, "coco_url": ""})
    annotations.extend(annotation(scene, seg, next(kinds), category_ids)
                       for seg in scene.segments)
  return {"info": {"description": "unires_jax test scenes"}, "images": images,
          "annotations": annotations,
          "categories": [{"id": i, "name": n, "supercategory": "thing"}
                         for n, i in category_ids.items()]}


def sentences(ref) -> list[dict]:
  """A ref's sentences as the refer toolkit stores them; `raw` differs from `sent` on purpose
  (RefCOCO's raw text keeps case and punctuation), so readers that take `sent` are checked."""
  return [{"tokens": s.split(), "raw": s.upper() + ".", "sent_id": i, "sent": s}
          for s, i in zip(ref.sentences, ref.sent_ids)]


def ref_record(scene: Scene, ref, split: str, category_ids: dict[str, int]) -> dict:
  """One refer-toolkit ref of a single object annotation."""
  if len(ref.segment_ids) != 1:
    raise ValueError(f"ref {ref.ref_id}: RefCOCO refs name exactly one annotation, got "
                     f"{ref.segment_ids}")
  seg = scene.segment(ref.segment_ids[0])
  if seg.part is not None:
    raise ValueError(f"ref {ref.ref_id}: COCO has no part annotations (segment {seg.id})")
  return {"sent_ids": list(ref.sent_ids),
          # The release's file_name names a crop that does not exist; readers ignore it.
          "file_name": f"{os.path.splitext(scene.file_name)[0]}_{seg.id}.jpg",
          "ann_id": seg.id, "ref_id": ref.ref_id, "image_id": scene.image_id, "split": split,
          "sentences": sentences(ref), "category_id": category_ids[seg.category]}


def write_images(root: str, scenes: list[Scene]) -> None:
  for scene in scenes:
    write_jpeg(os.path.join(root, "images", "train2014", scene.file_name), scene.pixels)


def write(root: str, dataset: str, refs: dict[str, dict[str, list[Scene]]], *,
          segmentation_kind: str = "alternate") -> None:
  """Writes `RAW/<dataset>/` and the images of its scenes.

  Args:
    root: RAW.
    dataset: "refcoco", "refcoco+" or "refcocog".
    refs: {split_by: {split: [scenes]}}, e.g. {"umd": {"train": [...], "val": [...]}}; every ref of
      a scene gets the scene's split. A scene listed under several split_bys is one image in
      instances.json.
    segmentation_kind: one of SEGMENTATIONS or "alternate".
  """
  scenes = {}
  for by_split in refs.values():
    for scene in itertools.chain.from_iterable(by_split.values()):
      scenes.setdefault(scene.image_id, scene)
  coco = instances(list(scenes.values()), segmentation_kind)
  category_ids = {c["name"]: c["id"] for c in coco["categories"]}
  folder = os.path.join(root, dataset)
  utils.write_atomic(os.path.join(folder, "instances.json"), json.dumps(coco).encode())
  for split_by, by_split in refs.items():
    records = [ref_record(scene, ref, split, category_ids)
               for split, split_scenes in by_split.items() for scene in split_scenes
               for ref in scene.refs]
    utils.write_atomic(os.path.join(folder, f"refs({split_by}).p"),
                       pickle.dumps(records, protocol=2))
  write_images(root, list(scenes.values()))
