"""The images of one split of a raw dataset, for work on images before a build (proposals).

`images(dataset, manual_dir, split, config)` lists `(file name, path)` of every image that a
reference of the split refers to, in the raw layouts the builders read (see each builder's
README): RefCOCOm's `annotations/<split>.json`, the refer toolkit's `refs(<by>).p` of RefCOCO,
RefCOCO+ and RefCOCOg, gRefCOCO's `grefs(unc).json`, with COCO's `instances.json`, and the
`refs/<split>.json[l]` of your own data (`unires_jax.data.ref_custom`).
"""

import os

from unires_jax.data import raw_io, ref_custom
from unires_jax.data.proposals import DATASETS
from unires_jax.data.records import RecordError


def _refs(path: str) -> list:
  refs = raw_io.load_plain_pickle(path) if path.endswith(".p") else raw_io.read_json(path)
  if not isinstance(refs, list):
    raise RecordError(path, f"expected a list of references, got {type(refs).__name__}")
  return refs


def _field(record, key: str, where: str):
  if not isinstance(record, dict) or key not in record:
    raise RecordError(where, f"missing field {key!r}")
  return record[key]


def _coco_file_names(refs_path: str, instances_path: str, split: str) -> list[str]:
  """The COCO file names of the images that the refs of `split` refer to, in order."""
  image_ids = {}
  for index, record in enumerate(_refs(refs_path)):
    where = f"{refs_path}, ref #{index}"
    if _field(record, "split", where) == split:
      image_ids.setdefault(_field(record, "image_id", where), None)
  if not image_ids:
    raise RecordError(refs_path, f"no reference of split {split!r}")
  instances = raw_io.read_json(instances_path)
  names = {}
  for index, info in enumerate(_field(instances, "images", instances_path)):
    where = f"{instances_path}, images[{index}]"
    names[_field(info, "id", where)] = _field(info, "file_name", where)
  missing = [i for i in image_ids if i not in names]
  if missing:
    raise RecordError(refs_path, f"image_id {missing[0]} (split {split!r}) is not among the "
                      f"images of {instances_path}")
  return [names[i] for i in image_ids]


def _custom_images(manual_dir: str, split: str) -> list[tuple[str, str]]:
  """The images of a split of your own data, in the order of their first reference."""
  folder = ref_custom.load(manual_dir)
  if folder.fatal:
    raise folder.fatal
  if split not in folder.splits:
    raise RecordError(os.path.join(manual_dir, ref_custom.REFS),
                      f"no split {split!r}; it has {sorted(folder.splits)}")
  image_ids = {}
  for line, record in ref_custom.split_records(folder, split, ref_custom.Problems(stop=True)):
    image_ids.setdefault(_field(record, "image_id", f"{folder.splits[split]}:{line}"), line)
  names = []
  for image_id, line in image_ids.items():
    entry = folder.images.get(image_id)
    if entry is None:
      raise RecordError(f"{folder.splits[split]}:{line}", f"image_id {image_id!r} is not a good "
                        f"image of {folder.instances} (unires-data check lists why)")
    names.append(entry.fields["file_name"])
  return [(name, os.path.join(manual_dir, ref_custom.IMAGES, name)) for name in names]


def images(dataset: str, manual_dir: str, split: str,
           config: str | None = None) -> list[tuple[str, str]]:
  """`(file name, path)` of the images of `split`, each once, in the order of their first
  reference. `config` is ref_coco's builder config (refcoco_unc, refcocog_umd, ...).

  Raises:
    RecordError: a missing or malformed raw file, naming it.
    ValueError: an unknown dataset, or a config where it does not belong.
  """
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
  if (dataset == "ref_coco") != (config is not None):
    raise ValueError(f"ref_coco needs its builder config (e.g. refcoco_unc), the others none; "
                     f"got dataset={dataset!r}, config={config!r}")
  if dataset == "ref_coco_m":
    path = os.path.join(manual_dir, "annotations", f"{split}.json")
    names = {}
    for index, record in enumerate(_refs(path)):
      names.setdefault(_field(record, "img_name", f"{path}, record {index}"), None)
    return [(name, os.path.join(manual_dir, "images", name)) for name in names]
  if dataset == "ref_custom":
    return _custom_images(manual_dir, split)
  if dataset == "ref_coco":
    name, split_by = config.rsplit("_", 1)
    folder = os.path.join(manual_dir, name)
    names = _coco_file_names(os.path.join(folder, f"refs({split_by}).p"),
                             os.path.join(folder, "instances.json"), split)
  else:
    names = _coco_file_names(os.path.join(manual_dir, "grefs(unc).json"),
                             os.path.join(manual_dir, "instances.json"), split)
  return [(name, os.path.join(manual_dir, "images", "train2014", name)) for name in names]
