"""RefCOCOm: part- and object-level referring expressions on COCO (UniRES, CVPR 2024).

Also builds ShapesParts (`unires_jax.data.shapes_parts`), which is written in this layout.
The raw layout and the fields read are documented in README.md beside this file.
"""

import collections
import functools
import os
from typing import Any

import tensorflow_datasets as tfds

from unires_jax.data import builder_lib, raw_io, schema
from unires_jax.data import proposals as proposal_files
from unires_jax.data.records import RecordError

SPLITS = ("train", "val", "testA", "testB")  # train: ShapesParts; RefCOCOm releases the others.


def _field(record: dict, key: str, where: str) -> Any:
  if not isinstance(record, dict) or key not in record:
    raise RecordError(where, f"annotation has no field {key!r}")
  return record[key]


def _as_list(value) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value]


class Builder(builder_lib.Builder):
  """RefCOCOm (val, testA, testB; train when present), one example per image."""

  HOMEPAGE = "https://github.com/Rubics-Xuan/MRES"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the RefCOCOm release in `manual_dir` (see README.md for every field):
    manual_dir/annotations/{val,testA,testB}.json
    manual_dir/masks/<segment_id>.png
    manual_dir/images/COCO_train2014_*.jpg   (COCO train2014 images, or a link to that folder)
    manual_dir/proposals/<split>.json        (optional region proposals: unires-propose)
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    present = [s for s in SPLITS if os.path.exists(os.path.join(root, "annotations", f"{s}.json"))]
    if not present:
      raise FileNotFoundError(
          f"{root}/annotations holds none of {[s + '.json' for s in SPLITS]}; see the builder's "
          "MANUAL_DOWNLOAD_INSTRUCTIONS")
    return {split: self._generate_examples(root, split) for split in present}

  def _generate_examples(self, root: str, split: str):
    path = os.path.join(root, "annotations", f"{split}.json")
    annotations = raw_io.read_json(path)
    if not isinstance(annotations, list):
      raise RecordError(path, f"expected a list of references, got {type(annotations).__name__}")
    proposals_path = proposal_files.path(root, "ref_coco_m", split)
    proposals = proposal_files.read(proposals_path) if os.path.exists(proposals_path) else {}
    by_image = collections.defaultdict(list)
    for index, record in enumerate(annotations):
      where = f"{path}, record {index}"
      by_image[_field(record, "img_name", where)].append((index, record))
    to_record = functools.partial(_to_record, root, path, proposals)
    yield from self.examples(by_image.items(), to_record, what=f"RefCOCOm {split}")


def _to_record(root: str, path: str, proposals: dict, item) -> schema.ImageRecord:
  img_name, indexed = item
  where = f"{path}, image {img_name}"
  image, height, width = raw_io.read_image(os.path.join(root, "images", img_name), where)
  targets: list[schema.Target] = []
  index_of: dict[int, int] = {}
  expressions = []
  for index, record in indexed:
    rwhere = f"{path}, record {index}"
    seg_ids = _as_list(_field(record, "segment_id", rwhere))
    n = len(seg_ids)
    boxes = _field(record, "bbox", rwhere) if n else []
    boxes = [boxes] if n == 1 and not isinstance(boxes[0], (list, tuple)) else boxes
    cats = _as_list(_field(record, "cat", rwhere)) if n else []
    parts = _as_list(record.get("part_name", [""] * n if n > 1 else ""))
    if not len(boxes) == len(cats) == len(parts) == n:
      raise RecordError(rwhere, f"segment_id, bbox, cat and part_name differ in length "
                        f"({n}, {len(boxes)}, {len(cats)}, {len(parts)})")
    raw = {k: v for k, v in record.items() if k != "sentences"}
    for seg_id, box, cat, part in zip(seg_ids, boxes, cats, parts):
      if not isinstance(seg_id, int):
        raise RecordError(rwhere, f"segment_id {seg_id!r} is not an integer")
      if seg_id in index_of:
        continue
      mask = raw_io.read_mask_png(os.path.join(root, "masks", f"{seg_id}.png"), rwhere)
      index_of[seg_id] = len(targets)
      targets.append(schema.Target(
          id=seg_id, mask=mask, box=raw_io.xywh_to_xyxy(box),
          category=f"{cat}:{part}" if part else str(cat),
          granularity="part" if part else "object", raw=raw))
    for sentence in _field(record, "sentences", rwhere):
      expressions.append(schema.Expression(
          text=_field(sentence, "sent", rwhere), id=_field(sentence, "sent_id", rwhere),
          ref_id=record.get("ref_id", index), targets=[index_of[s] for s in seg_ids]))
  boxes = proposals.get(img_name, {})
  image_id = indexed[0][1].get("image_id", os.path.splitext(img_name)[0])
  return schema.ImageRecord(
      where=where, image_id=str(image_id), file_name=img_name, image=image, height=height,
      width=width, targets=targets, expressions=expressions,
      object_proposals=boxes.get("object_boxes"), part_proposals=boxes.get("part_boxes"))
