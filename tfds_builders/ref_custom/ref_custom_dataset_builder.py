"""Your own referring data: a folder of images, a COCO `instances.json` and a references file per
split (any split names), in the layout of `unires_jax.data.ref_custom` (documented, with every
field, in README.md beside this file). Check a folder with `unires-data check` before a build.
"""

import functools
import os

import tensorflow_datasets as tfds

from unires_jax.data import builder_lib, coco_refs, records, ref_custom


class Builder(builder_lib.Builder):
  """Your own data (`unires_jax.data.ref_custom`), one example per image and split."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put your data in `manual_dir` (see README.md; `unires-data check --manual_dir=RAW` lists every
  problem with file and line):
    manual_dir/instances.json           COCO images, annotations (polygons, RLE or mask_file),
                                        categories
    manual_dir/images/<file_name>
    manual_dir/refs/<split>.jsonl       a reference per line (or <split>.json, a list)
    manual_dir/masks/...                PNG masks named by annotations' mask_file (optional)
    manual_dir/proposals/<split>.json   optional region proposals (unires-propose)
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    folder = ref_custom.load(os.fspath(dl_manager.manual_dir))
    if folder.fatal:
      raise folder.fatal
    seen = ref_custom.Seen()  # ids per split, part flags per annotation: across splits
    return {split: self._generate_examples(folder, split, seen) for split in folder.splits}

  def _generate_examples(self, folder: ref_custom.Folder, split: str, seen: ref_custom.Seen):
    """`(image id, example)` per image that the split's references refer to."""
    stop = ref_custom.Problems(stop=True)
    path = folder.splits[split]
    parse = functools.partial(ref_custom.parse_ref, folder, split, seen, stop)
    refs = list(records.convert_all(ref_custom.split_records(folder, split, stop), parse,
                                    self.policy, what=path))
    images = coco_refs.group_by_split_and_image(refs).get(split, {})
    to_record = functools.partial(ref_custom.image_record, folder,
                                  ref_custom.split_proposals(folder, split), stop)
    yield from self.examples(images.items(), to_record, what=f"ref_custom {split}")
