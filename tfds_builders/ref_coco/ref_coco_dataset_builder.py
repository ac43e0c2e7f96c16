"""RefCOCO, RefCOCO+ and RefCOCOg in the refer-toolkit layout (lichengunc/refer).

One example per image and split, holding all of that image's references of the split. The raw
layout and the fields read are documented in README.md beside this file.
"""

import dataclasses
import functools
import os

import tensorflow_datasets as tfds

from unires_jax.data import builder_lib, coco_refs, raw_io, records
from unires_jax.data import proposals as proposal_files
from unires_jax.data.records import RecordError

# Config name -> the splits its refs file holds (refcocog_google released no test split).
CONFIG_SPLITS = {
    "refcoco_unc": ("train", "val", "testA", "testB"),
    "refcoco+_unc": ("train", "val", "testA", "testB"),
    "refcocog_umd": ("train", "val", "test"),
    "refcocog_google": ("train", "val"),
}


@dataclasses.dataclass
class RefCocoConfig(builder_lib.BuilderConfig):
  """`name` is "<dataset>_<split_by>" (a key of CONFIG_SPLITS); the other fields follow from it,
  so that the command line's `--config '{"name": "refcoco_unc", "skip_bad": true}'` works."""

  dataset: str = dataclasses.field(init=False)  # folder in manual_dir: "refcoco+"
  split_by: str = dataclasses.field(init=False)  # refs file: "refs(unc).p"
  splits: tuple[str, ...] = dataclasses.field(init=False)

  def __post_init__(self):
    if self.name not in CONFIG_SPLITS:
      raise ValueError(f"unknown config {self.name!r}; expected one of {list(CONFIG_SPLITS)}")
    self.dataset, self.split_by = self.name.rsplit("_", 1)
    self.splits = CONFIG_SPLITS[self.name]
    if not self.description:
      self.description = (f"{self.dataset} with the {self.split_by} splits "
                          f"({', '.join(self.splits)}).")


class Builder(builder_lib.Builder):
  """RefCOCO / RefCOCO+ / RefCOCOg, one example per image and split."""

  BUILDER_CONFIGS = [RefCocoConfig(name=name) for name in CONFIG_SPLITS]
  HOMEPAGE = "https://github.com/lichengunc/refer"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the refer-toolkit annotations and the COCO train2014 images in `manual_dir` (see README.md):
    manual_dir/refcoco/refs(unc).p        manual_dir/refcoco/instances.json
    manual_dir/refcoco+/refs(unc).p       manual_dir/refcoco+/instances.json
    manual_dir/refcocog/refs(umd).p       manual_dir/refcocog/refs(google).p
    manual_dir/refcocog/instances.json
    manual_dir/images/train2014/COCO_train2014_*.jpg
    manual_dir/proposals/<config>/<split>.json   (optional region proposals: unires-propose)
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    root = os.fspath(dl_manager.manual_dir)
    folder = os.path.join(root, cfg.dataset)
    refs_path = os.path.join(folder, f"refs({cfg.split_by}).p")
    coco = coco_refs.load_instances(os.path.join(folder, "instances.json"))
    raw_refs = raw_io.load_plain_pickle(refs_path)  # Refuses class references: runs no code.
    if not isinstance(raw_refs, list):
      raise RecordError(refs_path, f"expected a list of refs, got {type(raw_refs).__name__}")
    parse = functools.partial(_parse_ref, refs_path, cfg.splits)
    refs = list(records.convert_all(enumerate(raw_refs), parse, self.policy, what=refs_path))
    groups = coco_refs.group_by_split_and_image(refs)
    missing = [s for s in cfg.splits if s not in groups]
    if missing:
      raise RecordError(refs_path, f"no ref of split(s) {missing}; config {cfg.name} has "
                        f"{list(cfg.splits)}")
    to_record = functools.partial(_to_record, coco, os.path.join(root, "images", "train2014"),
                                  refs_path)
    return {split: self._generate_examples(root, split, groups[split], to_record,
                                           f"{cfg.name} {split}")
            for split in cfg.splits}

  def _generate_examples(self, root: str, split: str, images: dict[int, list[coco_refs.Ref]],
                         to_record, what: str):
    """`(image id, example)` per image of one split; `images` maps image id -> its refs. The
    split's proposal file (`unires_jax.data.proposals.path`), when RAW has one, gives the
    images their proposals."""
    path = proposal_files.path(root, "ref_coco", split, self.builder_config.name)
    proposals = proposal_files.read(path) if os.path.exists(path) else None
    to_record = functools.partial(to_record, proposals)
    yield from self.examples(images.items(), to_record, what)


def _parse_ref(path: str, splits: tuple[str, ...], item) -> coco_refs.Ref:
  """A refer-toolkit ref (`ann_id` one annotation id; `file_name` ignored: it names no file)."""
  index, record = item
  where = coco_refs.ref_where(path, record, index)
  common = coco_refs.parse_common(record, where, splits)
  ann_id = coco_refs.integer(coco_refs.field(record, "ann_id", where), "ann_id", where)
  return coco_refs.Ref(ann_ids=[ann_id], **common)


def _to_record(coco, image_root, refs_path, proposals, item):
  image_id, refs = item
  return coco_refs.image_record(coco, image_root, refs_path, image_id, refs, proposals)
