"""A built UniRES++ dataset (any builder's, the shared schema) -> the folder of your own data.

  from unires_jax.data import export
  export.export("ref_coco_m", data_dir=DATA, out=RAW2,
                splits={"train": "train[:200]", "heldout": "val"})
  # then: tfds build tfds_builders/ref_custom --manual_dir RAW2 --data_dir DATA

So a dataset can be re-cut (new splits from TFDS slices of the old), edited as files, and mixed
with others. Images are written as the dataset stores them (the raw JPEG bytes); masks as COCO
compressed RLE or PNG files; each target's `raw` fields under the annotation's "source"; the
proposals to `proposals/<split>.json`. Building the folder gives the same examples (tested:
tests/data/test_ref_custom_export.py), but for proposal boxes, which are rounded to 1/100 pixel.
"""

import dataclasses
import io
import json
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image

from unires_jax import utils
from unires_jax.data import ref_custom, schema
from unires_jax.data.writers import ref_custom as folder_writer

MASK_FORMATS = ("rle", "png")


class ExportError(ValueError):
  """The dataset cannot be written as one folder (ids that would clash); names the example."""


@dataclasses.dataclass
class _Written:
  """What the folder holds so far, to write each image and annotation once and refuse clashes."""

  files: dict[str, str] = dataclasses.field(default_factory=dict)  # image id -> file name
  names: dict[str, str] = dataclasses.field(default_factory=dict)  # file name -> image id
  annotations: dict[int, str] = dataclasses.field(default_factory=dict)  # ann id -> image id
  refs: set[tuple[str, int]] = dataclasses.field(default_factory=set)  # (split, ref id)


def _image_id(text: str) -> int | str:
  """The raw id back: an integer when the text is one, as COCO ids are."""
  return int(text) if text.isdigit() and str(int(text)) == text else text


def _add_example(writer: folder_writer.FolderWriter, written: _Written, split: str,
                 ex: dict[str, Any], where: str, mask_format: str) -> None:
  """One decoded example (image bytes, masks `[H, W, 1]`) into `writer`."""
  image_id, file_name = ex["image_id"].decode(), ex["file_name"].decode()
  raw_id = _image_id(image_id)
  if image_id not in written.files:
    if written.names.get(file_name, image_id) != image_id:
      raise ExportError(f"{where}: images {written.names[file_name]} and {image_id} are both "
                        f"{file_name!r}")
    if os.path.isabs(file_name) or ".." in file_name.split("/"):
      raise ExportError(f"{where}: file name {file_name!r} leaves the images folder")
    with Image.open(io.BytesIO(ex["image"])) as im:
      width, height = im.size
    writer.add_image(raw_id, file_name, ex["image"], height, width)
    written.files[image_id], written.names[file_name] = file_name, image_id
  elif written.files[image_id] != file_name:
    raise ExportError(f"{where}: image {image_id} is {file_name!r} here and "
                      f"{written.files[image_id]!r} in another split")
  t = ex["targets"]
  ids = [int(i) for i in t["id"]]
  for j, ann_id in enumerate(ids):
    if ann_id in written.annotations:
      if written.annotations[ann_id] != image_id:
        raise ExportError(f"{where}: target {ann_id} is also on image "
                          f"{written.annotations[ann_id]}; a folder needs unique annotation ids")
      continue
    written.annotations[ann_id] = image_id
    x1, y1, x2, y2 = (float(v) for v in t["box"][j])
    source = t["raw"][j].decode()
    writer.add_annotation(ann_id, raw_id, t["category"][j].decode(), t["mask"][j][..., 0],
                          [x1, y1, x2 - x1, y2 - y1], mask_format,
                          **({"source": json.loads(source)} if source else {}))
  is_part = [schema.TARGET_GRANULARITIES[g] == "part" for g in t["granularity"]]
  e = ex["expressions"]
  refs: dict[int, tuple[list[int], list[str], list[int]]] = {}
  for k, ref_id in enumerate(int(r) for r in e["ref_id"]):
    indices = [int(i) for i in e["target_indices"][k]]
    ann_ids, texts, sent_ids = refs.setdefault(ref_id, ([ids[i] for i in indices], [], []))
    if ann_ids != [ids[i] for i in indices]:
      raise ExportError(f"{where}: the sentences of ref {ref_id} refer to different targets")
    texts.append(e["text"][k].decode())
    sent_ids.append(int(e["id"][k]))
  for ref_id, (ann_ids, texts, sent_ids) in refs.items():
    if (split, ref_id) in written.refs:
      raise ExportError(f"{where}: ref_id {ref_id} is on two images of split {split!r}")
    written.refs.add((split, ref_id))
    writer.add_ref(split, ref_id, raw_id, ann_ids, [is_part[ids.index(a)] for a in ann_ids],
                   texts, sent_ids)
  p = ex["proposals"]
  if len(p["object_boxes"]) or len(p["part_boxes"]):
    writer.add_proposals(split, file_name, p["object_boxes"], p["part_boxes"])


def export(name: str, data_dir: str | None, out: str, splits: Mapping[str, str] | None = None,
           *, mask_format: str = "rle") -> dict[str, int]:
  """Writes the built dataset `name` as a new folder `out` (nothing is left there on an error).

  Args:
    name: as `config.input.train.<label>.name` names it ("ref_coco_m", "ref_coco/refcoco_unc",
      with ":<version>" or not; `unires_jax.data.pipeline.dataset_dir`).
    data_dir: the TFDS data dir it was built in (None: TFDS's default).
    out: the folder to write; must not exist.
    splits: {new split: TFDS split of `name`, sliced or added ("train[:200]", "val+testA")};
      None: every split under its own name.
    mask_format: "rle" (compressed RLE in instances.json) or "png" (masks/<ann id>.png).

  Returns:
    the images written per new split.

  Raises:
    ExportError: ids that clash in one folder (an annotation id on two images, a ref id on two
      images of a split, one file name for two images).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from unires_jax.data import decoding, pipeline  # pylint: disable=g-import-not-at-top

  if mask_format not in MASK_FORMATS:
    raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
  builder = tfds.builder_from_directory(pipeline.dataset_dir(name, data_dir))
  splits = dict(splits or {s: s for s in sorted(builder.info.splits)})
  bad = [s for s in splits if not ref_custom.SPLIT_NAME.fullmatch(s)]
  if bad:
    raise ValueError(f"split names {bad} are not of [A-Za-z0-9_-]+")
  decoders = {"image": tfds.decode.SkipDecoding(), "targets": {"mask": decoding.MaskDecoder()}}
  counts, written = {}, _Written()
  with utils.new_directory(out) as tmp:
    writer = folder_writer.FolderWriter(tmp)
    for new, spec in splits.items():
      source = builder.as_data_source(split=spec, decoders=decoders)
      for i in range(len(source)):
        _add_example(writer, written, new, source[i], f"{name} {spec} example {i}", mask_format)
      counts[new] = len(source)
    writer.close()
  return counts
