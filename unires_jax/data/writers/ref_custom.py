"""Writes the folder of your own data (`unires_jax.data.ref_custom`, built by
`tfds_builders/ref_custom`): from scenes (`write`: tests, scripts) or entry by entry
(`FolderWriter`: `unires_jax.data.export` writes a built dataset with it).

  RAW/instances.json   RAW/images/<file_name>   RAW/masks/<ann id>.png   RAW/refs/<split>.jsonl
  RAW/proposals/<split>.json
"""

import io
import json
import os

import numpy as np
from PIL import Image

from unires_jax import utils
from unires_jax.data import proposals as proposal_files, ref_custom
from unires_jax.data.writers import common, refcoco

# How a mask is stored: refcoco's COCO segmentations, or a PNG file named by `mask_file`.
# "alternate" (in `write`) cycles through all four by annotation.
MASK_FORMATS = refcoco.SEGMENTATIONS + ("png",)
REF_FORMATS = ("jsonl", "json")


def png_bytes(mask: np.ndarray) -> bytes:
  """`[H, W]` mask -> PNG of 0 outside and 255 inside."""
  buf = io.BytesIO()
  Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255, mode="L").save(buf, "PNG")
  return buf.getvalue()


def instances_text(coco: dict[str, list[dict]]) -> str:
  """COCO's sections as JSON with one entry a line (errors name the line, diffs stay short)."""
  sections = (f'"{key}": [\n' + ",\n".join(json.dumps(e) for e in entries) + "\n]"
              for key, entries in coco.items())
  return "{" + ",\n".join(sections) + "}\n"


class FolderWriter:
  """Writes image and mask files into `root` as they come and, on `close`, instances.json, the
  split files and the proposal files. Category ids are given by name, in order of first use."""

  def __init__(self, root: str, ref_format: str = "jsonl"):
    if ref_format not in REF_FORMATS:
      raise ValueError(f"ref_format must be one of {REF_FORMATS}, got {ref_format!r}")
    self.root, self.ref_format = root, ref_format
    self.images: list[dict] = []
    self.annotations: list[dict] = []
    self.categories: dict[str, int] = {}
    self.refs: dict[str, list[dict]] = {}
    self.proposals: dict[str, dict[str, dict]] = {}

  def _write_file(self, relative: str, data: bytes) -> None:
    path = os.path.join(self.root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)

  def add_image(self, image_id, file_name: str, data: bytes, height: int, width: int) -> None:
    """An image file (encoded bytes, written as they are) and its entry."""
    self._write_file(os.path.join(ref_custom.IMAGES, file_name), data)
    self.images.append({"id": image_id, "file_name": file_name, "height": height,
                        "width": width})

  def add_annotation(self, ann_id: int, image_id, category: str, mask: np.ndarray,
                     box_xywh, mask_format: str, polygon: list[float] | None = None,
                     **fields) -> None:
    """An annotation of `mask` (`[H, W]`) stored in `mask_format` (one of MASK_FORMATS; a
    polygon only where `polygon` rasterises to exactly `mask`, else compressed RLE)."""
    if mask_format not in MASK_FORMATS:
      raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    entry = {"id": ann_id, "image_id": image_id,
             "category_id": self.categories.setdefault(category, len(self.categories) + 1),
             "bbox": [float(v) for v in box_xywh], "area": float(np.count_nonzero(mask)),
             **fields}
    if mask_format == "png":
      entry["mask_file"] = f"masks/{ann_id}.png"
      self._write_file(entry["mask_file"], png_bytes(mask))
    else:
      entry["segmentation"] = refcoco.segmentation(
          common.Segment(ann_id, np.asarray(mask, bool), category, polygon=polygon), mask_format)
    self.annotations.append(entry)

  def add_ref(self, split: str, ref_id: int, image_id, ann_ids: list[int], parts: list[bool],
              sentences: list[str], sent_ids: list[int]) -> None:
    """A reference of `split`; `parts[k]`: whether `ann_ids[k]` is a part."""
    record = {"ref_id": ref_id, "image_id": image_id, "ann_ids": list(ann_ids),
              "sentences": list(sentences), "sent_ids": list(sent_ids)}
    if any(parts):
      record["part"] = True if all(parts) else list(parts)
    self.refs.setdefault(split, []).append(record)

  def add_proposals(self, split: str, file_name: str, object_boxes: np.ndarray,
                    part_boxes: np.ndarray) -> None:
    """An image's `[n, 4]` and `[m, 4]` x1, y1, x2, y2 proposals, in the split's file."""
    self.proposals.setdefault(split, {})[file_name] = proposal_files.entry(object_boxes,
                                                                           part_boxes)

  def close(self) -> None:
    """Writes instances.json, refs/<split>.<ref_format> and proposals/<split>.json."""
    coco = {"images": self.images, "annotations": self.annotations,
            "categories": [{"id": i, "name": n} for n, i in self.categories.items()]}
    utils.write_atomic(os.path.join(self.root, ref_custom.INSTANCES), instances_text(coco))
    for split, records in self.refs.items():
      path = os.path.join(self.root, ref_custom.REFS, f"{split}.{self.ref_format}")
      text = ("".join(json.dumps(r) + "\n" for r in records) if self.ref_format == "jsonl"
              else json.dumps(records, indent=1))
      utils.write_atomic(path, text)
    for split, entries in self.proposals.items():
      utils.write_atomic(proposal_files.path(self.root, "ref_custom", split),
                         proposal_files.dumps(entries))


def _jpeg(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def write(root: str, splits: dict[str, list[common.Scene]], *, mask_format: str = "alternate",
          ref_format: str = "jsonl") -> None:
  """Writes `splits` ({split: [scenes]}) under `root`: a part segment's category is
  "<category>:<part>"; scenes listed in several splits are one image.

  Args:
    mask_format: one of MASK_FORMATS, or "alternate" to cycle through them by annotation.
    ref_format: "jsonl" (a reference a line) or "json" (a list, indented: a record a few lines).
  """
  writer = FolderWriter(root, ref_format)
  formats = MASK_FORMATS if mask_format == "alternate" else (mask_format,)
  written, k = set(), 0
  for split, scenes in splits.items():
    for scene in scenes:
      if scene.image_id not in written:
        written.add(scene.image_id)
        h, w = scene.pixels.shape[:2]
        writer.add_image(scene.image_id, scene.file_name, _jpeg(scene.pixels), h, w)
        for seg in scene.segments:
          category = f"{seg.category}:{seg.part}" if seg.part else seg.category
          writer.add_annotation(seg.id, scene.image_id, category, seg.mask, seg.box_xywh,
                                formats[k % len(formats)], seg.polygon)
          k += 1
      for ref in scene.refs:
        parts = [scene.segment(i).part is not None for i in ref.segment_ids]
        writer.add_ref(split, ref.ref_id, scene.image_id, ref.segment_ids, parts,
                       ref.sentences, ref.sent_ids)
      if scene.object_proposals is not None:
        writer.add_proposals(split, scene.file_name, scene.object_proposals,
                             scene.part_proposals)
  writer.close()
