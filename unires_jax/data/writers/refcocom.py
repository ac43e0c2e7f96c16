"""Writes scenes in the RefCOCOm raw layout (documented in tfds_builders/ref_coco_m/README.md).

  RAW/images/<img_name>                  JPEG
  RAW/annotations/<split>.json           list of references (one per segment and its sentences)
  RAW/masks/<segment_id>.png             0/255
  RAW/proposals/<split>.json             optional: {img_name: {"object_boxes": [[x, y, w, h]],
                                                              "part_boxes": [[x, y, w, h]]}}
"""

import json
import os

import numpy as np

from unires_jax import utils
from unires_jax.data.writers.common import Scene, write_jpeg, write_png


def reference_record(scene: Scene, ref, height: int, width: int) -> dict:
  """One RefCOCOm annotation record. A single segment is stored as in RefCOCOm (`segment_id`
  an int, `bbox` one box); several or no targets (the ShapesParts extension) as lists."""
  segs = [scene.segment(i) for i in ref.segment_ids]
  record = {
      "img_name": scene.file_name,
      "image_id": scene.image_id,
      "height": height,
      "width": width,
      "ref_id": ref.ref_id,
      "sentences": [{"sent": s, "sent_id": i, "tokens": s.split()}
                    for s, i in zip(ref.sentences, ref.sent_ids)],
  }
  if len(segs) == 1:
    seg = segs[0]
    record.update(segment_id=seg.id, bbox=seg.box_xywh, cat=seg.category)
    if seg.part is not None:
      record["part_name"] = seg.part
  else:
    record.update(segment_id=[s.id for s in segs], bbox=[s.box_xywh for s in segs],
                  cat=[s.category for s in segs],
                  part_name=[s.part or "" for s in segs])
  return record


def write(root: str, splits: dict[str, list[Scene]], *, with_proposals: bool = True) -> None:
  """Writes `splits` ({"val": [scenes], ...}) under `root` in the RefCOCOm layout."""
  for split, scenes in splits.items():
    annotations, proposals = [], {}
    for scene in scenes:
      h, w = scene.pixels.shape[:2]
      write_jpeg(os.path.join(root, "images", scene.file_name), scene.pixels)
      for seg in scene.segments:
        write_png(os.path.join(root, "masks", f"{seg.id}.png"), seg.mask.astype(np.uint8) * 255)
      annotations.extend(reference_record(scene, ref, h, w) for ref in scene.refs)
      if scene.object_proposals is not None:
        proposals[scene.file_name] = {
            key: [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
                  for x1, y1, x2, y2 in np.asarray(boxes).reshape(-1, 4)]
            for key, boxes in (("object_boxes", scene.object_proposals),
                               ("part_boxes", scene.part_proposals))}
    utils.write_atomic(os.path.join(root, "annotations", f"{split}.json"),
                       json.dumps(annotations).encode())
    if with_proposals and proposals:
      utils.write_atomic(os.path.join(root, "proposals", f"{split}.json"),
                         json.dumps(proposals).encode())
