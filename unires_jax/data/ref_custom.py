"""Your own referring data: the folder that `tfds_builders/ref_custom` builds, read and checked.

  RAW/instances.json          COCO: images, annotations, categories (below)
  RAW/images/<file_name>      the images that instances.json names (subfolders allowed)
  RAW/masks/...               PNG masks that annotations name by `mask_file` (optional)
  RAW/refs/<split>.jsonl      one reference per line (or RAW/refs/<split>.json: a list of them);
                              every file is a split, of any name ([A-Za-z0-9_-]+)
  RAW/proposals/<split>.json  optional region proposals (`unires_jax.data.proposals`)

instances.json is COCO's: `images` (`id` an integer or a string, `file_name`, `height`,
`width`), `categories` (`id`, `name`; a part category is named "<object>:<part>" by convention)
and `annotations` (`id`, `image_id`, `category_id`, the mask as exactly one of `segmentation`
(polygons, compressed or uncompressed RLE, decoded with pycocotools) or `mask_file` (a PNG
beside the folder's root, nonzero inside, the image's size), `bbox` [x, y, w, h] optional:
the mask's box when absent). A reference:

  {"ref_id": 7, "image_id": 3, "ann_ids": [12], "sentences": ["the wheels of the red truck"],
   "sent_ids": [70], "part": true}

  ann_ids     the annotations it refers to: one (an object or a part), several (multi), none ([])
  sentences   non-empty texts that all refer to them
  sent_ids    optional, one per sentence; default 1000 * ref_id + its position
  part        optional: true when its targets are parts (a list: one flag per ann id); an
              annotation is a part in every reference to it or in none

`ref_id` and sentence ids are unique within a split. Every check reports to a `Problems`: the
checker (`check`) collects them all, the builder stops at the first of a record (`stop=True`:
then `records.BadRecordPolicy` stops or skips). Errors name `file:line`.
"""

import dataclasses
import math
import os
import re
from typing import Any, Callable

import numpy as np

from unires_jax.data import coco_refs, proposals as proposal_files, raw_io, schema
from unires_jax.data.records import RecordError

INSTANCES = "instances.json"
IMAGES = "images"
REFS = "refs"
REF_FIELDS = ("ref_id", "image_id", "ann_ids", "sentences", "sent_ids", "part")
SENTENCES_PER_REF = 1000  # default sentence ids: SENTENCES_PER_REF * ref_id + position
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
_REF_SUFFIXES = (".jsonl", ".json")


class Problems:
  """Where checks report: `Problems()` keeps them all (in `found`), `Problems(stop=True)` raises
  the first as a `RecordError`."""

  def __init__(self, stop: bool = False):
    self.stop = stop
    self.found: list[RecordError] = []

  def add(self, error: RecordError) -> None:
    if self.stop:
      raise error
    self.found.append(error)

  def __call__(self, where: str, message: str) -> None:
    self.add(RecordError(where, message))


@dataclasses.dataclass
class Entry:
  """An entry of instances.json and the line it starts on."""

  line: int
  fields: dict[str, Any]


@dataclasses.dataclass
class Folder:
  """A folder's instances.json by id and its split files.

  `problems` are those found in instances.json and in the refs folder. `fatal` is one of them
  when no build can start (a missing or malformed instances.json, no split). An entry with a
  problem is left out of `images` / `annotations` / `categories` and its id maps to that problem
  in `broken`, so that a reference to it fails without being reported twice.
  """

  root: str
  instances: str  # path of instances.json
  images: dict[Any, Entry] = dataclasses.field(default_factory=dict)
  annotations: dict[int, Entry] = dataclasses.field(default_factory=dict)
  categories: dict[int, Entry] = dataclasses.field(default_factory=dict)
  broken: dict[tuple[str, Any], RecordError] = dataclasses.field(default_factory=dict)
  splits: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> refs file
  problems: list[RecordError] = dataclasses.field(default_factory=list)
  fatal: RecordError | None = None
  readable: bool = False  # instances.json was read: ids can be looked up


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _image_id_ok(value) -> bool:
  return _is_int(value) or isinstance(value, str) and bool(value)


def _relative_path(value) -> bool:
  """A relative path inside the folder (no `..`, not absolute)."""
  return (isinstance(value, str) and bool(value) and not os.path.isabs(value)
          and ".." not in value.replace("\\", "/").split("/"))


class _EntryCheck:
  """The problems of one entry of instances.json; `ok` when there were none."""

  def __init__(self, folder: Folder, where: str):
    self.folder, self.where, self.errors = folder, where, []

  def __call__(self, message: str) -> None:
    error = RecordError(self.where, message)
    self.errors.append(error)
    self.folder.problems.append(error)

  def depend(self, kind: str, key) -> bool:
    """Whether the entry `(kind, key)` it needs is broken; if so this one is too (one report)."""
    error = self.folder.broken.get((kind, key))
    if error is not None and not self.errors:
      self.errors.append(error)
    return error is not None

  @property
  def ok(self) -> bool:
    return not self.errors


def _section(folder: Folder, coco: Any, lines: Any, key: str) -> list[tuple[int, Any]]:
  entries = coco.get(key) if isinstance(coco, dict) else None
  if not isinstance(entries, list):
    folder.fatal = RecordError(folder.instances, f"has no list {key!r}")
    folder.problems.append(folder.fatal)
    return []
  return list(zip(lines[key], entries))


def _register(folder: Folder, table: dict, kind: str, entry: Entry, check: _EntryCheck,
              first_lines: dict) -> None:
  """Files `entry` under its id unless it had problems. A duplicate id breaks the id (a
  reference to it would be ambiguous), reported on each repetition."""
  key = entry.fields["id"]
  if key in first_lines:
    check(f"duplicate {kind} id {key!r}: also on line {first_lines[key]}")
    table.pop(key, None)
    folder.broken.setdefault((kind, key), check.errors[-1])
    return
  first_lines[key] = entry.line
  if check.ok:
    table[key] = entry
  else:
    folder.broken[(kind, key)] = check.errors[0]


def _entries(folder: Folder, coco, lines, key: str, kind: str, valid_id, id_doc: str):
  """`(line, entry, its check)` of each entry of section `key` that has a valid id (`valid_id`);
  the others are reported."""
  for line, entry in _section(folder, coco, lines, key):
    check = _EntryCheck(folder, f"{folder.instances}:{line}, {kind}")
    if not isinstance(entry, dict) or not valid_id(entry.get("id")):
      check(f"a {kind} is an object with {id_doc}, got {entry!r:.100}")
      continue
    check.where += f" {entry['id']!r}"
    yield line, entry, check


def _load_categories(folder: Folder, coco, lines) -> None:
  first_lines = {}
  for line, c, check in _entries(folder, coco, lines, "categories", "category", _is_int,
                                 "an integer 'id'"):
    if not isinstance(c.get("name"), str) or not c["name"].strip():
      check(f"'name' must be a non-empty string, got {c.get('name')!r}")
    _register(folder, folder.categories, "category", Entry(line, c), check, first_lines)


def _load_images(folder: Folder, coco, lines) -> None:
  names: dict[str, int] = {}
  first_lines = {}
  for line, im, check in _entries(folder, coco, lines, "images", "image", _image_id_ok,
                                  "an 'id' (an integer or a non-empty string)"):
    name = im.get("file_name")
    if not _relative_path(name):
      check(f"'file_name' must be a path relative to {IMAGES}/, got {name!r}")
    elif name in names:
      check(f"file_name {name!r} is also the image's on line {names[name]}")
    else:
      names[name] = line
    for key in ("height", "width"):
      if not _is_int(im.get(key)) or im[key] <= 0:
        check(f"{key!r} must be a positive integer, got {im.get(key)!r}")
    _register(folder, folder.images, "image", Entry(line, im), check, first_lines)


def _polygon_problem(segmentation: list, height: int, width: int) -> str | None:
  for polygon in segmentation:
    if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
        or not all(_is_number(v) for v in polygon)):
      return (f"a polygon is a list of at least 3 points x1, y1, x2, y2, ... (numbers), got "
              f"{polygon!r:.100}")
    for x, y in zip(polygon[::2], polygon[1::2]):
      if not (-0.5 <= x <= width + 0.5 and -0.5 <= y <= height + 0.5):
        return f"mask outside the image: polygon point ({x}, {y}) lies outside the {width}x{height} image"
  return None


def _mask_problem(ann: dict, height: int, width: int) -> str | None:
  """What is wrong with an annotation's mask fields, as far as is seen without decoding."""
  has_seg, has_file = "segmentation" in ann, "mask_file" in ann
  if has_seg == has_file:
    return "needs exactly one of 'segmentation' (polygons or RLE) and 'mask_file' (a PNG)"
  if has_file:
    return None if _relative_path(ann["mask_file"]) else (
        f"'mask_file' must be a path relative to the folder, got {ann['mask_file']!r}")
  seg = ann["segmentation"]
  if isinstance(seg, list):
    return _polygon_problem(seg, height, width)
  if (not isinstance(seg, dict) or "counts" not in seg or not isinstance(seg.get("size"), list)):
    return f"'segmentation' is neither polygons nor RLE ('size' and 'counts'): {seg!r:.100}"
  if seg["size"] != [height, width]:
    return (f"mask outside the image: RLE size {seg['size']} differs from the image's "
            f"{[height, width]} (height, width)")
  return None


def _load_annotations(folder: Folder, coco, lines) -> None:
  first_lines = {}
  for line, ann, check in _entries(folder, coco, lines, "annotations", "annotation", _is_int,
                                   "an integer 'id'"):
    image_id, category_id = ann.get("image_id"), ann.get("category_id")
    image = folder.images.get(image_id)
    if image is None and not check.depend("image", image_id):
      check(f"image_id {image_id!r} is not among the images")
    if category_id not in folder.categories and not check.depend("category", category_id):
      check(f"category_id {category_id!r} is not among the categories")
    if image is not None:
      h, w = image.fields["height"], image.fields["width"]
      problem = _mask_problem(ann, h, w)
      if problem:
        check(problem)
      if "bbox" in ann:
        bbox = ann["bbox"]
        if (not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox))
            or bbox[2] < 0 or bbox[3] < 0):
          check(f"'bbox' must be [x, y, w, h] (4 numbers, w and h >= 0), got {bbox!r}")
        else:
          try:
            schema.check_box(raw_io.xywh_to_xyxy(bbox), h, w, check.where, "bbox")
          except RecordError as e:
            check(e.message)
    _register(folder, folder.annotations, "annotation", Entry(line, ann), check, first_lines)


def _find_splits(folder: Folder) -> None:
  refs_dir = os.path.join(folder.root, REFS)
  names = sorted(os.listdir(refs_dir)) if os.path.isdir(refs_dir) else []
  for name in names:
    path = os.path.join(refs_dir, name)
    split, suffix = os.path.splitext(name)
    if suffix not in _REF_SUFFIXES or not SPLIT_NAME.fullmatch(split):
      folder.problems.append(RecordError(path, "not a split's references: name them "
                                         "<split>.jsonl or <split>.json, split of [A-Za-z0-9_-]"))
    elif split in folder.splits:
      folder.problems.append(RecordError(path, f"split {split!r} also has "
                                         f"{folder.splits[split]}: keep one"))
    else:
      folder.splits[split] = path
  if not folder.splits:
    folder.fatal = folder.fatal or RecordError(
        refs_dir, "holds no <split>.jsonl or <split>.json: no split to build")
    if not folder.problems or folder.problems[-1] is not folder.fatal:
      folder.problems.append(folder.fatal)


def load(root: str) -> Folder:
  """Reads instances.json and lists the split files of the folder `root`, collecting problems."""
  folder = Folder(root=root, instances=os.path.join(root, INSTANCES))
  try:
    coco, lines = raw_io.read_json_with_lines(folder.instances)
  except RecordError as e:
    folder.fatal = e
    folder.problems.append(e)
  else:
    if not isinstance(coco, dict):
      folder.fatal = RecordError(folder.instances, f"expected a JSON object (COCO), got "
                                 f"{type(coco).__name__}")
      folder.problems.append(folder.fatal)
    else:
      _load_categories(folder, coco, lines)
      _load_images(folder, coco, lines)
      _load_annotations(folder, coco, lines)
      folder.readable = folder.fatal is None
  _find_splits(folder)
  return folder


def split_records(folder: Folder, split: str, problems: Problems) -> list[tuple[int, Any]]:
  """`(line, record)` of the split's file; a line that is no JSON goes to `problems`.

  Raises:
    RecordError: a missing or malformed JSON file (not a list), whatever `problems` does.
  """
  path = folder.splits[split]
  if path.endswith(".jsonl"):
    items = raw_io.read_json_lines(path, problems.add)
  else:
    value, lines = raw_io.read_json_with_lines(path)
    if not isinstance(value, list):
      raise RecordError(path, f"expected a list of references, got {type(value).__name__}")
    items = list(zip(lines, value))
  if not items:
    problems(path, "holds no reference")
  return items


@dataclasses.dataclass
class Ref(coco_refs.Ref):
  """A checked reference; `parts[k]`: whether annotation `ann_ids[k]` is a part."""

  parts: list[bool] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Seen:
  """What earlier references claimed: ids per split (duplicates), part flags per annotation."""

  ref_ids: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)
  sent_ids: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)
  parts: dict[int, tuple[bool, str]] = dataclasses.field(default_factory=dict)


def _claim(table: dict, key, where: str, report: Callable[[str], None], what: str) -> None:
  if key in table:
    report(f"{what} {key[1]} is also on {table[key]}")
  else:
    table[key] = where


def _sentences(record: dict, report: Callable[[str], None]) -> list[str]:
  sentences = record.get("sentences")
  if not isinstance(sentences, list) or not sentences:
    report(f"'sentences' must be a non-empty list of texts, got {sentences!r:.100}")
    return []
  for k, s in enumerate(sentences):
    if not isinstance(s, str) or not s.strip():
      report(f"empty sentence: sentences[{k}] is {s!r}")
  return sentences


def _sent_ids(record: dict, ref_id: int, count: int, report: Callable[[str], None]) -> list[int]:
  ids = record.get("sent_ids")
  if ids is None:
    if count > SENTENCES_PER_REF:
      report(f"{count} sentences: more than {SENTENCES_PER_REF} need 'sent_ids'")
    return [SENTENCES_PER_REF * ref_id + k for k in range(count)]
  if not isinstance(ids, list) or len(ids) != count or not all(map(_is_int, ids)):
    report(f"'sent_ids' must be {count} integers (one per sentence), got {ids!r:.100}")
    return []
  if len(set(ids)) != len(ids):
    report(f"duplicate ids in sent_ids {ids}")
  return ids


def _parts(record: dict, count: int, report: Callable[[str], None]) -> list[bool]:
  part = record.get("part", False)
  if isinstance(part, bool):
    return [part] * count
  if isinstance(part, list) and len(part) == count and all(isinstance(p, bool) for p in part):
    return part
  report(f"'part' must be true, false or {count} booleans (one per ann id), got {part!r:.100}")
  return []


def _ann_ids(folder: Folder, record: dict, image_id, report: Callable[[str], None],
             refuse: Callable[[RecordError], None]) -> list[int]:
  ann_ids = record.get("ann_ids")
  if not isinstance(ann_ids, list) or not all(map(_is_int, ann_ids)):
    report(f"'ann_ids' must be a list of annotation ids ([] for no target), got "
           f"{ann_ids!r:.100}")
    return []
  if len(set(ann_ids)) != len(ann_ids):
    report(f"duplicate ids in ann_ids {ann_ids}")
  if not folder.readable:
    return ann_ids
  for ann_id in ann_ids:
    entry = folder.annotations.get(ann_id)
    if ("annotation", ann_id) in folder.broken:
      refuse(folder.broken[("annotation", ann_id)])
    elif entry is None:
      report(f"unknown annotation id {ann_id}: not in {folder.instances}")
    elif entry.fields["image_id"] != image_id and image_id in folder.images:
      report(f"annotation {ann_id} is on image {entry.fields['image_id']!r}, not on image "
             f"{image_id!r}")
  return ann_ids


def parse_ref(folder: Folder, split: str, seen: Seen, problems: Problems,
              item: tuple[int, Any]) -> Ref | None:
  """One record of a split's file (`(line, record)`), checked against `folder`; None when it
  had problems (each reported to `problems`, which may raise the first)."""
  line, record = item
  where = f"{folder.splits[split]}:{line}"
  errors: list[RecordError] = []

  def report(message: str) -> None:
    errors.append(RecordError(where, message))
    problems.add(errors[-1])

  def refuse(error: RecordError) -> None:  # a broken entry it needs: reported where it is
    errors.append(error)
    if problems.stop:
      raise RecordError(where, f"refers to a bad entry: {error}")

  if not isinstance(record, dict):
    report(f"a reference is a JSON object, got {record!r:.100}")
    return None
  ref_id = record.get("ref_id")
  if not _is_int(ref_id):
    report(f"'ref_id' must be an integer, got {ref_id!r}")
    ref_id = None
  else:
    where = f"{where}, ref {ref_id}"
    _claim(seen.ref_ids, (split, ref_id), where, report, "ref_id")
  unknown = sorted(set(record) - set(REF_FIELDS))
  if unknown:
    report(f"unknown field(s) {unknown}; a reference has {list(REF_FIELDS)}")
  image_id = record.get("image_id")
  if folder.readable and ("image", image_id) in folder.broken:
    refuse(folder.broken[("image", image_id)])
  elif folder.readable and image_id not in folder.images:
    report(f"unknown image_id {image_id!r}: not in {folder.instances}")
  ann_ids = _ann_ids(folder, record, image_id, report, refuse)
  sentences = _sentences(record, report)
  sent_ids = _sent_ids(record, ref_id, len(sentences), report) if ref_id is not None else []
  for sent_id in sent_ids:
    _claim(seen.sent_ids, (split, sent_id), where, report, "sentence id")
  parts = _parts(record, len(ann_ids), report)
  for ann_id, part in zip(ann_ids, parts):
    before = seen.parts.setdefault(ann_id, (part, where))
    if before[0] != part:
      kind = ("a part", "an object")
      report(f"annotation {ann_id} is {kind[not part]} here and {kind[not before[0]]} on "
             f"{before[1]}")
  if errors:
    return None
  return Ref(where=where, ref_id=ref_id, image_id=image_id, ann_ids=ann_ids, split=split,
             sentences=list(zip(sent_ids, sentences)), parts=parts)


def _mask(folder: Folder, entry: Entry, height: int, width: int, where: str) -> np.ndarray:
  """An annotation's `[height, width]` bool mask. Raises RecordError."""
  ann = entry.fields
  if "segmentation" in ann:
    return raw_io.coco_segmentation_to_mask(ann["segmentation"], height, width, where)
  path = os.path.join(folder.root, ann["mask_file"])
  mask = raw_io.read_mask_png(path, where)
  if mask.shape != (height, width):
    raise RecordError(where, f"mask outside the image: mask file {path} is "
                      f"{mask.shape[1]}x{mask.shape[0]}, the image {width}x{height} "
                      "(width x height)")
  return mask


def mask_box(mask: np.ndarray) -> list[float]:
  """The tight x1, y1, x2, y2 box of a `[H, W]` mask; zeros when it is empty."""
  ys, xs = np.nonzero(mask)
  if not len(xs):
    return [0.0, 0.0, 0.0, 0.0]
  return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _target(folder: Folder, ann_id: int, part: bool, height: int, width: int) -> schema.Target:
  entry = folder.annotations[ann_id]
  ann = entry.fields
  where = f"{folder.instances}:{entry.line}, annotation {ann_id}"
  mask = _mask(folder, entry, height, width, where)
  box = raw_io.xywh_to_xyxy(ann["bbox"]) if "bbox" in ann else mask_box(mask)
  return schema.Target(id=ann_id, mask=mask, box=box,
                       category=folder.categories[ann["category_id"]].fields["name"],
                       granularity="part" if part else "object",
                       raw={k: v for k, v in ann.items() if k not in ("segmentation", "mask_file")})


def image_record(folder: Folder, proposals: dict[str, dict], problems: Problems,
                 item: tuple[Any, list[Ref]]) -> schema.ImageRecord | None:
  """One image with its references of a split (`(image_id, refs)`), its image file and masks
  decoded and checked; None when that found problems (reported to `problems`).

  `proposals`: the split's proposal file as `unires_jax.data.proposals.read` gives it.
  """
  image_id, refs = item
  entry = folder.images[image_id]
  info = entry.fields
  where = f"{folder.instances}:{entry.line}, image {image_id!r}"
  before = len(problems.found)
  path = os.path.join(folder.root, IMAGES, info["file_name"])
  try:
    image, height, width = raw_io.read_image(path, where)
  except RecordError as e:
    problems.add(e)
    return None
  if (height, width) != (info["height"], info["width"]):
    problems(where, f"{path} is {width}x{height}, instances.json says "
             f"{info['width']}x{info['height']} (width x height)")
    return None
  targets, index_of, expressions = [], {}, []
  for ref in refs:
    for ann_id, part in zip(ref.ann_ids, ref.parts):
      if ann_id not in index_of:
        index_of[ann_id] = len(targets)
        try:
          targets.append(_target(folder, ann_id, part, height, width))
        except RecordError as e:
          problems.add(e)
    expressions.extend(schema.Expression(text=text, id=sent_id, ref_id=ref.ref_id,
                                         targets=[index_of[a] for a in ref.ann_ids])
                       for sent_id, text in ref.sentences)
  boxes = proposals.get(info["file_name"], {})
  for key in proposal_files.KEYS:
    for k, box in enumerate(boxes.get(key, ())):
      try:
        schema.check_box(box, height, width, where, f"proposals {key}[{k}]")
      except RecordError as e:
        problems.add(e)
  if len(problems.found) > before:
    return None
  return schema.ImageRecord(
      where=f"{where} (refs {', '.join(str(r.ref_id) for r in refs)})", image_id=str(image_id),
      file_name=info["file_name"], image=image, height=height, width=width, targets=targets,
      expressions=expressions, object_proposals=boxes.get("object_boxes"),
      part_proposals=boxes.get("part_boxes"))


def split_proposals(folder: Folder, split: str) -> dict[str, dict[str, np.ndarray]]:
  """The split's proposal file (`proposals/<split>.json`) read, {} when there is none.

  Raises:
    RecordError: a malformed proposal file.
  """
  path = proposal_files.path(folder.root, "ref_custom", split)
  return proposal_files.read(path) if os.path.exists(path) else {}


@dataclasses.dataclass
class Summary:
  """What `check` read: per split, the references and images that passed."""

  refs: dict[str, int] = dataclasses.field(default_factory=dict)
  images: dict[str, int] = dataclasses.field(default_factory=dict)


def check(root: str) -> tuple[list[RecordError], Summary]:
  """Every problem of the folder `root` that a build would meet, and more (entries of
  instances.json that no reference uses are checked too, but their masks are not decoded).

  Returns:
    (problems in the order found, each naming file and line; what passed, per split).
  """
  folder = load(root)
  problems = Problems()
  problems.found.extend(folder.problems)
  summary = Summary()
  seen = Seen()
  for split in sorted(folder.splits):
    try:
      items = split_records(folder, split, problems)
    except RecordError as e:
      problems.add(e)
      continue
    refs = [r for r in (parse_ref(folder, split, seen, problems, item) for item in items) if r]
    summary.refs[split] = len(refs)
    if not folder.readable:
      continue
    try:
      boxes = split_proposals(folder, split)
    except RecordError as e:
      problems.add(e)
      boxes = {}
    images = coco_refs.group_by_split_and_image(refs).get(split, {})
    summary.images[split] = sum(
        image_record(folder, boxes, problems, item) is not None for item in images.items())
  return problems.found, summary
