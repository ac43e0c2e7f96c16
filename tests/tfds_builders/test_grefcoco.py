"""gRefCOCO builder: real `tfds build` on a small gRefCOCO directory (single-, multi- and no-target
refs), read back with TFDS alone and compared with the raw files; bad input fails naming the file
and the record."""

import collections
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.files import corrupt_file
from tests.tfds_builders import coco_raw, tfds_cli
from tfds_builders.grefcoco import grefcoco_dataset_builder as grefcoco_builder
from unires_jax.data.records import RecordError
from unires_jax.data.writers import common, grefcoco

# image ids per split. Every scene has 3 objects: a ref for each, one for the first two together
# and one for nothing (2 sentences each), refs 10 * id + (0, 1, 2, 3, 4).
SPLITS = {"train": [1, 2], "val": [3], "testA": [4], "testB": [5]}
UNREFERRED_IMAGE = 2  # the ref of its third object is dropped: that object is referred by none


def _scene(rng, image_id):
  height, width = (48, 64) if image_id % 2 else (40, 56)
  scene = common.random_scene(rng, image_id, height=height, width=width, with_parts=False,
                              multi_and_none=True, first_segment_id=100 * image_id,
                              first_ref_id=10 * image_id, first_sent_id=100 * image_id)
  if image_id == UNREFERRED_IMAGE:
    del scene.refs[2]
  return scene


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """(root, {image id: Scene})."""
  rng = np.random.default_rng(1)
  root = str(tmp_path_factory.mktemp("raw"))
  scenes = {i: _scene(rng, i) for ids in SPLITS.values() for i in ids}
  grefcoco.write(root, {split: [scenes[i] for i in ids] for split, ids in SPLITS.items()})
  return root, scenes


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("built"))
  tfds_cli.build("grefcoco", raw[0], data_dir)
  return data_dir


def _raw_files(root):
  with open(os.path.join(root, "grefs(unc).json")) as f:
    refs = json.load(f)
  with open(os.path.join(root, "instances.json")) as f:
    return refs, json.load(f)


def test_reads_back_as_the_raw_files(built, raw, tmp_path):
  root, scenes = raw
  refs, coco = _raw_files(root)
  kinds, granularities = set(), collections.Counter()
  for split, image_ids in SPLITS.items():
    examples = tfds_cli.read_back("grefcoco", split, built, str(tmp_path))
    assert len(examples) == len(image_ids)
    kinds |= coco_raw.check_split(examples, refs, coco, split, root, scenes)
    for ex in examples:
      for e in ex["expressions"]:
        granularities[e["granularity"]] += 1
      if ex["image_id"] == str(UNREFERRED_IMAGE):
        assert len(ex["targets"]) == 2
  # 5 images, 2 sentences a ref: 3 (2 on the unreferred image) single, 1 multi, 1 none each.
  assert granularities == {"object": 28, "multi": 10, "none": 10}
  assert kinds == {"polygon", "rle", "uncompressed_rle"}


def _rewrite_refs(root, ref_id, **changes):
  path = os.path.join(root, "grefs(unc).json")
  with open(path) as f:
    refs = json.load(f)
  next(r for r in refs if r["ref_id"] == ref_id).update(changes)
  with open(path, "w") as f:
    json.dump(refs, f)


def _image(root, image_id):
  return os.path.join(root, "images", "train2014", f"COCO_train2014_{image_id:012d}.jpg")


def _missing_image(root):
  os.remove(_image(root, 3))
  return (r"grefs\(unc\)\.json, image 3 \(refs 30, 31, 32, 33, 34\): image file "
          r".*000000000003\.jpg does not exist")


def _corrupt_image(root):
  corrupt_file(_image(root, 5))
  return r"grefs\(unc\)\.json, image 5 \(refs 50, .*\): image file .*000000000005\.jpg is corrupt"


def _no_target_with_targets(root):
  _rewrite_refs(root, 30, no_target=True)
  return r"grefs\(unc\)\.json, ref 30: no_target is True but ann_id is \[300\]"


def _target_without_no_target(root):
  _rewrite_refs(root, 34, no_target=False)
  return r"grefs\(unc\)\.json, ref 34: no_target is False but ann_id is \[-1\]"


def _minus_one_among_ids(root):
  _rewrite_refs(root, 33, ann_id=[300, -1])
  return r"grefs\(unc\)\.json, ref 33: ann_id \[300, -1\] mixes -1"


def _unknown_split(root):
  _rewrite_refs(root, 31, split="test")
  return r"grefs\(unc\)\.json, ref 31: unknown split 'test'"


def _unknown_annotation(root):
  _rewrite_refs(root, 32, ann_id=[999])
  return r"grefs\(unc\)\.json, ref 32: annotation 999 is not in .*instances\.json"


def _malformed_segmentation(root):
  path = os.path.join(root, "instances.json")
  with open(path) as f:
    coco = json.load(f)
  next(a for a in coco["annotations"] if a["id"] == 401)["segmentation"] = {
      "size": [1, 1], "counts": "1"}
  with open(path, "w") as f:
    json.dump(coco, f)
  return (r"instances\.json, annotation 401 \(ref 41\): bad segmentation: RLE size \[1, 1\] "
          r"differs from the image's \[40, 56\]")


@pytest.mark.parametrize("breakage", [
    _missing_image, _corrupt_image, _no_target_with_targets, _target_without_no_target,
    _minus_one_among_ids, _unknown_split, _unknown_annotation, _malformed_segmentation])
def test_bad_input_fails_naming_file_and_record(raw, tmp_path, breakage):
  manual_dir = str(tmp_path / "raw")
  shutil.copytree(raw[0], manual_dir)
  message = breakage(manual_dir)
  data_dir = str(tmp_path / "out")
  builder = grefcoco_builder.Builder(data_dir=data_dir)
  with pytest.raises(RecordError, match=message):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  assert not os.path.exists(os.path.join(data_dir, "grefcoco", "default", "1.0.0"))


def test_skip_bad_skips_and_counts_then_fails_past_the_fraction(raw, tmp_path):
  root, scenes = raw
  manual_dir = str(tmp_path / "raw")
  shutil.copytree(root, manual_dir)
  os.remove(_image(manual_dir, 2))  # 1 of the 2 train images.
  _no_target_with_targets(manual_dir)  # ref 30, 1 of 24 refs.
  refs, coco = _raw_files(manual_dir)

  def build(fraction, data_dir):
    config = json.dumps({"name": "default", "skip_bad": True, "max_bad_fraction": fraction})
    return tfds_cli.build("grefcoco", manual_dir, data_dir, "--config", config, check=False)

  ok_dir = str(tmp_path / "ok")
  proc = build(0.5, ok_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = proc.stdout + proc.stderr  # The CLI logs warnings to stdout.
  assert "grefs(unc).json: skipped 1 of 24 records" in log
  assert "gRefCOCO train: skipped 1 of 2 records" in log
  for split, want in (("train", ["1"]), ("val", ["3"])):
    examples = tfds_cli.read_back("grefcoco", split, ok_dir, str(tmp_path))
    assert [e["image_id"] for e in examples] == want
    kept = [r for r in refs if r["image_id"] != 2 and r["ref_id"] != 30]
    coco_raw.check_split(examples, kept, coco, split, manual_dir, scenes)

  failed_dir = str(tmp_path / "failed")
  proc = build(0.4, failed_dir)
  assert proc.returncode != 0
  assert "TooManyBadRecords: gRefCOCO train: 1 of 2 records are bad" in proc.stderr
  assert not os.path.exists(os.path.join(failed_dir, "grefcoco", "default", "1.0.0"))
  with pytest.raises(AssertionError, match="reading grefcoco/train failed"):
    tfds_cli.read_back("grefcoco", "train", failed_dir, str(tmp_path))
