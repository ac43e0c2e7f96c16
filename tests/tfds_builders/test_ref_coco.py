"""RefCOCO/+/g builder: real `tfds build` on a small refer-toolkit directory, read back with TFDS
alone and compared with the raw files; bad input fails naming the file and the record."""

import collections
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.files import corrupt_file
from tests.tfds_builders import coco_raw, tfds_cli
from tfds_builders.ref_coco import ref_coco_dataset_builder as ref_coco
from unires_jax.data import raw_io
from unires_jax.data.records import RecordError
from unires_jax.data.writers import common, refcoco

# image ids per config and split; every scene has 3 objects with one ref (2 sentences) each.
REFCOCO_UNC = {"train": [1, 2], "val": [3], "testA": [4], "testB": [5]}
REFCOCOG = {"umd": {"train": [11, 12], "val": [13], "test": [14]},
            "google": {"train": [11, 13], "val": [12, 14]}}
UNREFERRED_IMAGE = 2  # its last object is in instances.json but no ref names it


def _scene(rng, image_id):
  # Two image sizes, so that a swapped height/width shows.
  height, width = (48, 64) if image_id % 2 else (40, 56)
  scene = common.random_scene(rng, image_id, height=height, width=width, with_parts=False,
                              first_segment_id=100 * image_id, first_ref_id=10 * image_id,
                              first_sent_id=100 * image_id)
  if image_id == UNREFERRED_IMAGE:
    scene.refs = scene.refs[:-1]
  return scene


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """(root, {image id: Scene}) of refcoco (unc) and refcocog (umd, google)."""
  rng = np.random.default_rng(0)
  root = str(tmp_path_factory.mktemp("raw"))
  ids = sorted({i for s in [REFCOCO_UNC, *REFCOCOG.values()] for v in s.values() for i in v})
  scenes = {i: _scene(rng, i) for i in ids}

  def pick(splits):
    return {split: [scenes[i] for i in image_ids] for split, image_ids in splits.items()}

  refcoco.write(root, "refcoco", {"unc": pick(REFCOCO_UNC)})
  refcoco.write(root, "refcocog", {by: pick(splits) for by, splits in REFCOCOG.items()})
  return root, scenes


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("built"))
  for config in ("refcoco_unc", "refcocog_umd"):
    tfds_cli.build("ref_coco", raw[0], data_dir, "--config", config)
  return data_dir


def _raw_files(root, dataset, split_by):
  refs = raw_io.load_plain_pickle(os.path.join(root, dataset, f"refs({split_by}).p"))
  with open(os.path.join(root, dataset, "instances.json")) as f:
    return refs, json.load(f)


def test_configs():
  configs = ref_coco.Builder.builder_configs
  assert {name: c.splits for name, c in configs.items()} == {
      "refcoco_unc": ("train", "val", "testA", "testB"),
      "refcoco+_unc": ("train", "val", "testA", "testB"),
      "refcocog_umd": ("train", "val", "test"),
      "refcocog_google": ("train", "val")}
  # What `--config '{"name": "refcoco+_unc", "skip_bad": true}'` constructs.
  config = ref_coco.RefCocoConfig(name="refcoco+_unc", skip_bad=True)
  assert (config.dataset, config.split_by, config.skip_bad) == ("refcoco+", "unc", True)
  with pytest.raises(ValueError, match="unknown config 'refcoco_google'"):
    ref_coco.RefCocoConfig(name="refcoco_google")


@pytest.mark.parametrize("config, dataset, split_by, splits", [
    ("refcoco_unc", "refcoco", "unc", REFCOCO_UNC),
    ("refcocog_umd", "refcocog", "umd", REFCOCOG["umd"]),
])
def test_reads_back_as_the_raw_files(built, raw, tmp_path, config, dataset, split_by, splits):
  root, scenes = raw
  refs, coco = _raw_files(root, dataset, split_by)
  kinds = set()
  for split, image_ids in splits.items():
    # The version is named: TFDS's own `ref_coco` has these config names (see README.md).
    examples = tfds_cli.read_back(f"ref_coco/{config}:1.0.0", split, built, str(tmp_path))
    assert len(examples) == len(image_ids)
    kinds |= coco_raw.check_split(examples, refs, coco, split, root, scenes)
    if UNREFERRED_IMAGE in image_ids:
      ex = next(e for e in examples if e["image_id"] == str(UNREFERRED_IMAGE))
      assert len(ex["targets"]) == len(scenes[UNREFERRED_IMAGE].segments) - 1
  assert kinds == {"polygon", "rle", "uncompressed_rle"}


class _RunsCode:
  """Unpickling this would call os.mkdir(marker): a stand-in for code in a malicious pickle."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.mkdir, (self.marker,)


def _rewrite_refs(root, change):
  path = os.path.join(root, "refcoco", "refs(unc).p")
  refs = raw_io.load_plain_pickle(path)
  with open(path, "wb") as f:
    pickle.dump(change(refs), f, protocol=2)


def _image(root, image_id):
  return os.path.join(root, "images", "train2014", f"COCO_train2014_{image_id:012d}.jpg")


def _missing_image(root):
  os.remove(_image(root, 3))
  return r"refs\(unc\)\.p, image 3 \(refs 30, 31, 32\): image file .*000000000003\.jpg does not exist"


def _corrupt_image(root):
  corrupt_file(_image(root, 4))
  return r"refs\(unc\)\.p, image 4 \(refs 40, 41, 42\): image file .*000000000004\.jpg is corrupt"


def _class_in_pickle(root):
  _rewrite_refs(root, lambda refs: [collections.OrderedDict(refs[0])] + refs[1:])
  return r"refs\(unc\)\.p: not a pickle of plain data: refusing to load collections\.OrderedDict"


def _code_in_pickle(root):
  _rewrite_refs(root, lambda refs: refs + [_RunsCode(os.path.join(root, "pwned"))])
  return r"refs\(unc\)\.p: not a pickle of plain data: refusing to load posix\.mkdir"


def _unknown_split(root):
  def change(refs):
    refs[4]["split"] = "testC"
    return refs
  _rewrite_refs(root, change)
  return r"refs\(unc\)\.p, ref 21: unknown split 'testC'"


def _malformed_segmentation(root):
  path = os.path.join(root, "refcoco", "instances.json")
  with open(path) as f:
    coco = json.load(f)
  next(a for a in coco["annotations"] if a["id"] == 401)["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
  with open(path, "w") as f:
    json.dump(coco, f)
  return r"instances\.json, annotation 401 \(ref 41\): bad segmentation: no polygon with at least 3"


@pytest.mark.parametrize("breakage", [_missing_image, _corrupt_image, _class_in_pickle,
                                      _code_in_pickle, _unknown_split, _malformed_segmentation])
def test_bad_input_fails_naming_file_and_record(raw, tmp_path, breakage):
  manual_dir = str(tmp_path / "raw")
  shutil.copytree(raw[0], manual_dir)
  message = breakage(manual_dir)
  data_dir = str(tmp_path / "out")
  builder = ref_coco.Builder(config="refcoco_unc", data_dir=data_dir)
  with pytest.raises(RecordError, match=message):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  assert not os.path.exists(os.path.join(manual_dir, "pwned"))  # The pickle ran nothing.
  assert not os.path.exists(os.path.join(data_dir, "ref_coco", "refcoco_unc", "1.0.0"))


def test_skip_bad_skips_and_counts_then_fails_past_the_fraction(raw, tmp_path):
  root, scenes = raw
  manual_dir = str(tmp_path / "raw")
  shutil.copytree(root, manual_dir)
  os.remove(_image(manual_dir, 2))  # 1 of the 2 train images.
  _unknown_split(manual_dir)  # ref 21 (image 2), 1 of 14 refs.
  refs, coco = _raw_files(manual_dir, "refcoco", "unc")

  def build(fraction, data_dir):
    config = json.dumps({"name": "refcoco_unc", "skip_bad": True, "max_bad_fraction": fraction})
    return tfds_cli.build("ref_coco", manual_dir, data_dir, "--config", config, check=False)

  ok_dir = str(tmp_path / "ok")
  proc = build(0.5, ok_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = proc.stdout + proc.stderr  # The CLI logs warnings to stdout.
  assert "refs(unc).p: skipped 1 of 14 records" in log
  assert "refcoco_unc train: skipped 1 of 2 records" in log
  examples = tfds_cli.read_back("ref_coco/refcoco_unc:1.0.0", "train", ok_dir, str(tmp_path))
  assert [e["image_id"] for e in examples] == ["1"]
  kept = [r for r in refs if r["image_id"] != 2]
  coco_raw.check_split(examples, kept, coco, "train", manual_dir, scenes)

  failed_dir = str(tmp_path / "failed")
  proc = build(0.4, failed_dir)
  assert proc.returncode != 0
  assert "TooManyBadRecords: refcoco_unc train: 1 of 2 records are bad" in proc.stderr
  assert not os.path.exists(os.path.join(failed_dir, "ref_coco", "refcoco_unc", "1.0.0"))
  with pytest.raises(AssertionError, match="reading ref_coco/refcoco_unc:1.0.0/train failed"):
    tfds_cli.read_back("ref_coco/refcoco_unc:1.0.0", "train", failed_dir, str(tmp_path))
