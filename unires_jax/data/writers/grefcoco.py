"""Writes scenes in ReLA's gRefCOCO layout (GRES, CVPR 2023).

  RAW/grefs(unc).json                    list of refs; a ref names 0, 1 or several annotations
  RAW/instances.json                     COCO: images, annotations, categories
  RAW/images/train2014/<file_name>       JPEG

Documented field by field in tfds_builders/grefcoco/README.md. Scenes from
`random_scene(..., with_parts=False, multi_and_none=True)` hold single-, multi- and no-target refs.
"""

import json
import os

from unires_jax import utils
from unires_jax.data.writers.common import Scene
from unires_jax.data.writers.refcoco import instances, sentences, write_images

NO_TARGET_ID = -1  # gRefCOCO's `ann_id` and `category_id` of a ref that names nothing: [-1].


def gref_record(scene: Scene, ref, split: str, category_ids: dict[str, int]) -> dict:
  """One gRefCOCO ref; `ann_id` and `category_id` are lists, [-1] when there is no target."""
  segs = [scene.segment(i) for i in ref.segment_ids]
  if any(s.part is not None for s in segs):
    raise ValueError(f"ref {ref.ref_id}: COCO has no part annotations")
  return {"ref_id": ref.ref_id, "image_id": scene.image_id,
          "ann_id": [s.id for s in segs] or [NO_TARGET_ID],
          "category_id": [category_ids[s.category] for s in segs] or [NO_TARGET_ID],
          "split": split, "file_name": scene.file_name, "no_target": not segs,
          "sent_ids": list(ref.sent_ids), "sentences": sentences(ref)}


def write(root: str, splits: dict[str, list[Scene]], *,
          segmentation_kind: str = "alternate") -> None:
  """Writes `splits` ({"train": [scenes], ...}) under `root`; every ref of a scene gets the
  scene's split. `segmentation_kind`: see `refcoco.SEGMENTATIONS` ("alternate" cycles them)."""
  scenes = [scene for split_scenes in splits.values() for scene in split_scenes]
  coco = instances(scenes, segmentation_kind)
  category_ids = {c["name"]: c["id"] for c in coco["categories"]}
  grefs = [gref_record(scene, ref, split, category_ids)
           for split, split_scenes in splits.items() for scene in split_scenes
           for ref in scene.refs]
  utils.write_atomic(os.path.join(root, "instances.json"), json.dumps(coco).encode())
  utils.write_atomic(os.path.join(root, "grefs(unc).json"), json.dumps(grefs).encode())
  write_images(root, scenes)
