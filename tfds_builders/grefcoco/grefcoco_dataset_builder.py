"""gRefCOCO: generalized referring expressions (single-, multi- and no-target) on COCO (GRES).

One example per image and split, holding all of that image's references of the split. The raw
layout and the fields read are documented in README.md beside this file.
"""

import functools
import os

import tensorflow_datasets as tfds

from unires_jax.data import builder_lib, coco_refs, raw_io, records
from unires_jax.data import proposals as proposal_files
from unires_jax.data.records import RecordError

SPLITS = ("train", "val", "testA", "testB")
NO_TARGET_ID = -1  # `ann_id: [-1]` marks a ref that refers to nothing.


class Builder(builder_lib.Builder):
  """gRefCOCO (ReLA's `grefs(unc).json`), one example per image and split."""

  HOMEPAGE = "https://henghuiding.github.io/GRES/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the gRefCOCO release and the COCO train2014 images in `manual_dir` (see README.md):
    manual_dir/grefs(unc).json
    manual_dir/instances.json
    manual_dir/images/train2014/COCO_train2014_*.jpg
    manual_dir/proposals/<split>.json         (optional region proposals: unires-propose)
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    refs_path = os.path.join(root, "grefs(unc).json")
    coco = coco_refs.load_instances(os.path.join(root, "instances.json"))
    raw_refs = raw_io.read_json(refs_path)
    if not isinstance(raw_refs, list):
      raise RecordError(refs_path, f"expected a list of refs, got {type(raw_refs).__name__}")
    parse = functools.partial(_parse_ref, refs_path)
    refs = list(records.convert_all(enumerate(raw_refs), parse, self.policy, what=refs_path))
    groups = coco_refs.group_by_split_and_image(refs)
    missing = [s for s in SPLITS if s not in groups]
    if missing:
      raise RecordError(refs_path, f"no ref of split(s) {missing}")
    to_record = functools.partial(_to_record, coco, os.path.join(root, "images", "train2014"),
                                  refs_path)
    return {split: self._generate_examples(root, split, groups[split], to_record,
                                           f"gRefCOCO {split}")
            for split in SPLITS}

  def _generate_examples(self, root: str, split: str, images: dict[int, list[coco_refs.Ref]],
                         to_record, what: str):
    """`(image id, example)` per image of one split; `images` maps image id -> its refs. The
    split's proposal file (`unires_jax.data.proposals.path`), when RAW has one, gives the
    images their proposals."""
    path = proposal_files.path(root, "grefcoco", split)
    proposals = proposal_files.read(path) if os.path.exists(path) else None
    to_record = functools.partial(to_record, proposals)
    yield from self.examples(images.items(), to_record, what)


def _ann_ids(record: dict, where: str) -> list[int]:
  """The ref's annotation ids, [] for no target, checked against its `no_target` flag.

  `ann_id` is a list ([-1] alone = no target); a bare integer is read as a list of one, as
  ReLA's reader does.
  """
  raw = coco_refs.field(record, "ann_id", where)
  ids = [coco_refs.integer(a, "ann_id", where) for a in (raw if isinstance(raw, list) else [raw])]
  if not ids:
    raise RecordError(where, "ann_id is empty; a ref without target has ann_id [-1]")
  if NO_TARGET_ID in ids and ids != [NO_TARGET_ID]:
    raise RecordError(where, f"ann_id {ids} mixes -1 (no target) with annotation ids")
  no_target = ids == [NO_TARGET_ID]
  # Older releases may lack the flag; then ann_id [-1] alone decides.
  flag = record.get("no_target", no_target)
  if not isinstance(flag, bool) or flag != no_target:
    raise RecordError(where, f"no_target is {flag!r} but ann_id is {ids}")
  return [] if no_target else ids


def _parse_ref(path: str, item) -> coco_refs.Ref:
  index, record = item
  where = coco_refs.ref_where(path, record, index)
  common = coco_refs.parse_common(record, where, SPLITS)
  return coco_refs.Ref(ann_ids=_ann_ids(record, where), **common)


def _to_record(coco, image_root, refs_path, proposals, item):
  image_id, refs = item
  return coco_refs.image_record(coco, image_root, refs_path, image_id, refs, proposals)
