"""Checks of read-back COCO-based referring datasets against their raw files, computed here
independently of the builders: masks decoded with pycocotools straight from instances.json,
images with PIL straight from the JPEG, expressions from the refs file."""

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def decode_segmentation(seg, height: int, width: int) -> tuple[np.ndarray, str]:
  """COCO segmentation -> (`[H, W]` bool, kind: "polygon" | "rle" | "uncompressed_rle")."""
  if isinstance(seg, list):
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    return mask_utils.decode(rle).astype(bool), "polygon"
  if isinstance(seg["counts"], list):
    return mask_utils.decode(mask_utils.frPyObjects(seg, height, width)).astype(bool), \
        "uncompressed_rle"
  rle = {"size": seg["size"], "counts": seg["counts"].encode()}
  return mask_utils.decode(rle).astype(bool), "rle"


def expected_sentences(refs: list[dict], split: str) -> dict[str, list[tuple]]:
  """image id -> sorted [(sent_id, sent, ref_id, sorted ann ids, no_target)] of `split`."""
  want: dict[str, list[tuple]] = {}
  for ref in refs:
    if ref["split"] != split:
      continue
    ann_ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    ann_ids = sorted(a for a in ann_ids if a != -1)
    for s in ref["sentences"]:
      want.setdefault(str(ref["image_id"]), []).append(
          (s["sent_id"], s["sent"], ref["ref_id"], ann_ids, bool(ref.get("no_target", False))))
  return {k: sorted(v) for k, v in want.items()}


def check_split(examples: list[dict], refs: list[dict], coco: dict, split: str, root: str,
                scenes: dict) -> set[str]:
  """Asserts that `examples` (tfds_cli.read_back) hold exactly the raw `split`.

  Args:
    refs: the raw refs list; coco: the raw instances.json; root: the raw directory.
    scenes: image id -> the `common.Scene` the raw files were written from (their masks must be
      what pycocotools decodes, i.e. the writer is checked too).

  Returns:
    the segmentation kinds the checked targets were stored in.
  """
  anns = {a["id"]: a for a in coco["annotations"]}
  images = {str(i["id"]): i for i in coco["images"]}
  categories = {c["id"]: c["name"] for c in coco["categories"]}
  want = expected_sentences(refs, split)
  assert sorted(e["image_id"] for e in examples) == sorted(want)
  kinds = set()
  for ex in examples:
    info, scene = images[ex["image_id"]], scenes[int(ex["image_id"])]
    assert ex["file_name"] == info["file_name"]
    with Image.open(os.path.join(root, "images", "train2014", info["file_name"])) as im:
      np.testing.assert_array_equal(ex["image"], np.asarray(im.convert("RGB")))
    ids = [t["id"] for t in ex["targets"]]
    got = sorted((e["id"], e["text"], e["ref_id"], sorted(ids[i] for i in e["target_indices"]),
                  e["no_target"]) for e in ex["expressions"])
    assert got == want[ex["image_id"]]
    # Exactly the referred annotations, each once (unreferred ones of the image are left out).
    assert sorted(ids) == sorted({a for w in want[ex["image_id"]] for a in w[3]})
    for e in ex["expressions"]:
      n = len(e["target_indices"])
      assert e["granularity"] == ("none" if n == 0 else "multi" if n > 1 else "object")
      assert e["no_target"] == (n == 0)
    assert len(ex["object_boxes"]) == len(ex["part_boxes"]) == 0
    for t, mask in zip(ex["targets"], ex["masks"]):
      ann = anns[t["id"]]
      raw_mask, kind = decode_segmentation(ann["segmentation"], info["height"], info["width"])
      kinds.add(kind)
      np.testing.assert_array_equal(mask, raw_mask.astype(np.uint8))
      np.testing.assert_array_equal(raw_mask, scene.segment(t["id"]).mask)
      x, y, w, h = ann["bbox"]
      np.testing.assert_allclose(t["box"], [x, y, x + w, y + h], rtol=1e-6)
      assert t["category"] == categories[ann["category_id"]]
      assert t["granularity"] == "object"
      assert json.loads(t["raw"]) == {k: v for k, v in ann.items() if k != "segmentation"}
  return kinds
