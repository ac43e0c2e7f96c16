"""What the COCO-based referring builders share (RefCOCO/+/g in the refer-toolkit layout, gRefCOCO):
the `instances.json` index, a validated reference, and one image's references -> ImageRecord.

Each builder parses its own reference format into `Ref`s (RefCOCO: one annotation id; gRefCOCO: a
list, [-1] for no target) and groups them by split and image with `group_by_split_and_image`;
`image_record` then reads the image and the referred annotations.
"""

import collections
import dataclasses
import os
from typing import Any, Iterable, Sequence

from unires_jax.data import raw_io, schema
from unires_jax.data.records import RecordError


def field(record: Any, key: str, where: str) -> Any:
  """`record[key]`, or a RecordError naming `where` when `record` is no dict or lacks `key`."""
  if not isinstance(record, dict) or key not in record:
    raise RecordError(where, f"has no field {key!r}")
  return record[key]


def integer(value: Any, what: str, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise RecordError(where, f"{what} {value!r} is not an integer")
  return value


@dataclasses.dataclass
class CocoIndex:
  """`instances.json` by id. `path` names the file in errors."""

  path: str
  images: dict[int, dict]
  annotations: dict[int, dict]
  categories: dict[int, str]  # id -> name


def load_instances(path: str) -> CocoIndex:
  """Indexes a COCO `instances.json` (images, annotations, categories by id).

  Raises:
    RecordError: missing or malformed file, a section that is not a list, an entry without id.
  """
  coco = raw_io.read_json(path)
  sections = {}
  for key in ("images", "annotations", "categories"):
    entries = field(coco, key, path)
    if not isinstance(entries, list):
      raise RecordError(path, f"{key!r} is a {type(entries).__name__}, not a list")
    sections[key] = {integer(field(e, "id", f"{path}, {key}[{i}]"), "id", f"{path}, {key}[{i}]"): e
                     for i, e in enumerate(entries)}
  categories = {i: str(field(c, "name", f"{path}, category {i}"))
                for i, c in sections["categories"].items()}
  return CocoIndex(path, sections["images"], sections["annotations"], categories)


@dataclasses.dataclass
class Ref:
  """A reference checked for structure: its sentences all refer to `ann_ids` (empty = nothing)."""

  where: str  # "<refs file>, ref <ref_id>"
  ref_id: int
  image_id: int
  ann_ids: list[int]
  split: str
  sentences: list[tuple[int, Any]]  # (sent_id, sent); the text is validated by schema.to_example


def ref_where(path: str, record: Any, index: int) -> str:
  """Names a raw ref in errors by its ref_id, or by its position when it has none."""
  ref_id = record.get("ref_id") if isinstance(record, dict) else None
  return f"{path}, ref {ref_id}" if isinstance(ref_id, int) else f"{path}, ref #{index}"


def parse_common(record: Any, where: str, splits: Sequence[str]) -> dict[str, Any]:
  """The fields every refer-style ref has: ref_id, image_id, split (one of `splits`), sentences.

  Raises:
    RecordError: a missing or mistyped field, or a split that is not one of `splits`.
  """
  split = field(record, "split", where)
  if split not in splits:
    raise RecordError(where, f"unknown split {split!r} (expected one of {list(splits)})")
  sentences = field(record, "sentences", where)
  if not isinstance(sentences, list):
    raise RecordError(where, f"'sentences' is a {type(sentences).__name__}, not a list")
  return {
      "where": where,
      "ref_id": integer(field(record, "ref_id", where), "ref_id", where),
      "image_id": integer(field(record, "image_id", where), "image_id", where),
      "split": split,
      "sentences": [(integer(field(s, "sent_id", where), "sent_id", where),
                     field(s, "sent", where)) for s in sentences],
  }


def group_by_split_and_image(refs: Iterable[Ref]) -> dict[str, dict[int, list[Ref]]]:
  """{split: {image_id: [refs]}}, images in order of first appearance (one example each)."""
  groups: dict[str, dict[int, list[Ref]]] = collections.defaultdict(dict)
  for ref in refs:
    groups[ref.split].setdefault(ref.image_id, []).append(ref)
  return groups


def target(coco: CocoIndex, ann_id: int, image_id: int, height: int, width: int,
           ref: Ref) -> schema.Target:
  """The object annotation `ann_id` of `image_id` as a schema target (mask `[height, width]`).

  Raises:
    RecordError: naming instances.json and the annotation: unknown annotation, annotation of
      another image, malformed segmentation or bbox, unknown category.
  """
  ann = coco.annotations.get(ann_id)
  if ann is None:
    raise RecordError(ref.where, f"annotation {ann_id} is not in {coco.path}")
  where = f"{coco.path}, annotation {ann_id} (ref {ref.ref_id})"
  if ann.get("image_id") != image_id:
    raise RecordError(where, f"belongs to image {ann.get('image_id')!r}, but the ref is on image "
                      f"{image_id}")
  mask = raw_io.coco_segmentation_to_mask(field(ann, "segmentation", where), height, width, where)
  bbox = field(ann, "bbox", where)
  try:
    box = raw_io.xywh_to_xyxy(bbox)
  except (TypeError, ValueError):
    raise RecordError(where, f"bbox {bbox!r} is not 4 numbers x, y, w, h") from None
  category = coco.categories.get(field(ann, "category_id", where))
  if category is None:
    raise RecordError(where, f"category_id {ann['category_id']!r} is not in {coco.path}")
  return schema.Target(id=ann_id, mask=mask, box=box, category=category, granularity="object",
                       raw={k: v for k, v in ann.items() if k != "segmentation"})


def image_record(coco: CocoIndex, image_root: str, refs_path: str, image_id: int,
                 refs: list[Ref], proposals: dict[str, dict] | None = None
                 ) -> schema.ImageRecord:
  """One image with all of its `refs` (of one split): every referred annotation once as a target,
  every sentence as an expression; its proposals from `proposals` (a proposal file as
  `unires_jax.data.proposals.read` gives it, by file name) when that holds the image.

  Raises:
    RecordError: an image missing from instances.json or from `image_root`, a corrupt image, a
      size differing from instances.json, or a bad referred annotation (see `target`).
  """
  where = f"{refs_path}, image {image_id} (refs {', '.join(str(r.ref_id) for r in refs)})"
  info = coco.images.get(image_id)
  if info is None:
    raise RecordError(where, f"image {image_id} is not in {coco.path}")
  file_name = str(field(info, "file_name", f"{coco.path}, image {image_id}"))
  image, height, width = raw_io.read_image(os.path.join(image_root, file_name), where)
  if (info.get("height"), info.get("width")) != (height, width):
    raise RecordError(where, f"{file_name} is {width}x{height}, {coco.path} says "
                      f"{info.get('width')}x{info.get('height')} (width x height)")
  targets: list[schema.Target] = []
  index_of: dict[int, int] = {}
  expressions = []
  for ref in refs:
    for ann_id in ref.ann_ids:
      if ann_id not in index_of:
        index_of[ann_id] = len(targets)
        targets.append(target(coco, ann_id, image_id, height, width, ref))
    indices = [index_of[a] for a in ref.ann_ids]
    expressions.extend(schema.Expression(text=text, id=sent_id, ref_id=ref.ref_id, targets=indices)
                       for sent_id, text in ref.sentences)
  boxes = (proposals or {}).get(file_name, {})
  return schema.ImageRecord(where=where, image_id=str(image_id), file_name=file_name, image=image,
                            height=height, width=width, targets=targets, expressions=expressions,
                            object_proposals=boxes.get("object_boxes"),
                            part_proposals=boxes.get("part_boxes"))
