"""Region proposal files of a raw dataset: where they lie, how they read, how they write.

A proposal file holds, per image file name, the object and part boxes a detector found, in
pixels of the image as stored (x, y, w, h, as COCO writes boxes):

  {"COCO_train2014_000000000009.jpg": {"object_boxes": [[x, y, w, h], ...],
                                       "part_boxes": [[x, y, w, h], ...]}, ...}

Its place in the raw directory (`path`), read by the builders when it exists:
  ref_coco_m   RAW/proposals/<split>.json
  grefcoco     RAW/proposals/<split>.json
  ref_custom   RAW/proposals/<split>.json
  ref_coco     RAW/proposals/<config>/<split>.json   (config: refcoco_unc, refcocog_umd, ...; the
                                                      three datasets share split names)
`unires-propose` writes them (`unires_jax.propose`).
"""

import json
import os

import numpy as np

from unires_jax.data import raw_io
from unires_jax.data.records import RecordError

KEYS = ("object_boxes", "part_boxes")
DATASETS = ("ref_coco_m", "ref_coco", "grefcoco", "ref_custom")


def path(manual_dir: str, dataset: str, split: str, config: str | None = None) -> str:
  """The proposal file of `dataset`'s `split` (and builder `config`, for ref_coco) in RAW."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
  if (dataset == "ref_coco") != (config is not None):
    raise ValueError(f"a builder config (e.g. refcoco_unc) names the proposal file of ref_coco "
                     f"and of no other dataset; got dataset={dataset!r}, config={config!r}")
  folder = os.path.join(manual_dir, "proposals", *([config] if config else []))
  return os.path.join(folder, f"{split}.json")


def _boxes(value, where: str) -> np.ndarray:
  """A list of [x, y, w, h] -> `[n, 4]` float32 x1, y1, x2, y2, or a RecordError at `where`."""
  if not isinstance(value, list):
    raise RecordError(where, f"expected a list of [x, y, w, h] boxes, got {type(value).__name__}")
  out = np.zeros((len(value), 4), np.float32)
  for i, box in enumerate(value):
    if (not isinstance(box, list) or len(box) != 4
        or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in box)):
      raise RecordError(f"{where}[{i}]", f"expected [x, y, w, h] (4 finite numbers), got {box!r}")
    if box[2] < 0 or box[3] < 0:
      raise RecordError(f"{where}[{i}]", f"negative width or height in {box!r}")
    out[i] = raw_io.xywh_to_xyxy(box)
  return out


def read(file: str) -> dict[str, dict[str, np.ndarray]]:
  """A proposal file -> {file name: {"object_boxes": [n, 4], "part_boxes": [m, 4]}} float32
  x1, y1, x2, y2 pixels. A missing key is an empty list.

  Raises:
    RecordError: not a JSON object of that layout; the message names the file, image and field.
  """
  data = raw_io.read_json(file)
  if not isinstance(data, dict):
    raise RecordError(file, f"expected an object {{image file name: boxes}}, got "
                      f"{type(data).__name__}")
  out = {}
  for name, entry in data.items():
    where = f"{file}, image {name}"
    if not isinstance(entry, dict) or set(entry) - set(KEYS):
      raise RecordError(where, f"expected an object with keys among {KEYS}, got {entry!r:.200}")
    out[name] = {key: _boxes(entry.get(key, []), f"{where}, {key}") for key in KEYS}
  return out


def entry(object_boxes: np.ndarray, part_boxes: np.ndarray) -> dict[str, list[list[float]]]:
  """One image's `[n, 4]` and `[m, 4]` x1, y1, x2, y2 boxes -> its file entry (x, y, w, h, to
  1/100 pixel)."""
  def xywh(boxes):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    wh = boxes[:, 2:] - boxes[:, :2]
    return [[round(float(v), 2) for v in (*b[:2], *s)] for b, s in zip(boxes, wh)]
  return {"object_boxes": xywh(object_boxes), "part_boxes": xywh(part_boxes)}


def dumps(entries: dict[str, dict]) -> str:
  """The file's text: entries by file name, sorted (the same entries give the same bytes)."""
  return json.dumps(dict(sorted(entries.items())), separators=(",", ":"))
