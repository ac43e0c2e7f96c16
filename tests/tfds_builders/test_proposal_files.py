"""Proposal files (`unires_jax.data.proposals`) in the raw layouts of RefCOCO and gRefCOCO: the
images of a split are listed from the raw files, a split's file gives its examples their boxes
(other splits keep none), and a malformed file is refused naming the file, image and field."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from unires_jax.data import build, proposals, raw_images
from unires_jax.data.records import RecordError
from unires_jax.data.writers import common, grefcoco, refcoco

SPLITS = {"train": [1], "val": [2, 3], "testA": [4], "testB": [5]}


def _scenes(rng, multi_and_none: bool) -> dict[int, common.Scene]:
  return {i: common.random_scene(rng, i, height=40 + 4 * i, width=56, with_parts=False,
                                 multi_and_none=multi_and_none, first_segment_id=100 * i,
                                 first_ref_id=10 * i, first_sent_id=100 * i)
          for ids in SPLITS.values() for i in ids}


def _random_proposals(rng, scenes: list[common.Scene]) -> dict[str, dict]:
  """A file's entries: 2 object and 1 part box inside each image."""
  entries = {}
  for scene in scenes:
    h, w = scene.pixels.shape[:2]
    xy = rng.uniform(0, [w / 2, h / 2], (3, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, [w / 2, h / 2], (3, 2))], 1)
    entries[scene.file_name] = proposals.entry(boxes[:2], boxes[2:])
  return entries


@pytest.mark.parametrize("dataset", ["grefcoco", "ref_coco"])
def test_a_split_file_gives_its_examples_their_boxes(dataset, tmp_path):
  rng = np.random.default_rng(0)
  scenes = _scenes(rng, multi_and_none=dataset == "grefcoco")
  root = str(tmp_path / "raw")
  by_split = {split: [scenes[i] for i in ids] for split, ids in SPLITS.items()}
  if dataset == "grefcoco":
    grefcoco.write(root, by_split)
    config, tfds_name = None, "grefcoco"
  else:
    refcoco.write(root, "refcoco", {"unc": by_split})
    config, tfds_name = "refcoco_unc", "ref_coco/refcoco_unc"

  listed = raw_images.images(dataset, root, "val", config)
  assert [name for name, _ in listed] == [s.file_name for s in by_split["val"]]
  assert all(os.path.isfile(path) for _, path in listed)

  entries = _random_proposals(rng, by_split["val"])
  path = proposals.path(root, dataset, "val", config)
  os.makedirs(os.path.dirname(path))
  with open(path, "w", encoding="utf-8") as f:
    f.write(proposals.dumps(entries))
  data_dir = str(tmp_path / "tfds")
  build.prepare(dataset, manual_dir=root, data_dir=data_dir, config=config)
  expected = proposals.read(path)
  for split in ("val", "train"):
    for example in tfds.data_source(tfds_name, split=split, data_dir=data_dir):
      name = example["file_name"]
      name = name.decode() if isinstance(name, bytes) else str(name)
      for key in proposals.KEYS:
        got = np.asarray(example["proposals"][key]).reshape(-1, 4)
        if split == "val":
          np.testing.assert_allclose(got, expected[name][key], atol=1e-4, err_msg=name)
        else:
          assert got.size == 0, (split, name, key)


def test_paths_by_dataset(tmp_path):
  root = str(tmp_path)
  assert proposals.path(root, "ref_coco_m", "val") == f"{root}/proposals/val.json"
  assert proposals.path(root, "grefcoco", "testA") == f"{root}/proposals/testA.json"
  assert (proposals.path(root, "ref_coco", "val", "refcocog_umd")
          == f"{root}/proposals/refcocog_umd/val.json")
  with pytest.raises(ValueError, match="builder config"):
    proposals.path(root, "ref_coco", "val")
  with pytest.raises(ValueError, match="dataset must be one of"):
    proposals.path(root, "mres32m", "val")


@pytest.mark.parametrize("content, message", [
    ([], r"expected an object \{image file name: boxes\}"),
    ({"a.jpg": {"object_boxes": [[1, 2, 3]]}}, r"image a.jpg, object_boxes\[0\]: expected \[x, y"),
    ({"a.jpg": {"part_boxes": [[1, 2, -3, 4]]}}, r"image a.jpg, part_boxes\[0\]: negative width"),
    ({"a.jpg": {"objects": []}}, r"image a.jpg: expected an object with keys among"),
    ({"a.jpg": {"object_boxes": {"x": 1}}}, r"image a.jpg, object_boxes: expected a list"),
])
def test_a_malformed_file_is_refused_naming_the_place(content, message, tmp_path):
  path = str(tmp_path / "val.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(content, f)
  with pytest.raises(RecordError, match=rf"{path}.*{message}"):
    proposals.read(path)


def test_entries_round_trip_to_a_hundredth_of_a_pixel(tmp_path):
  boxes = np.array([[1.234, 2.5, 10.0, 20.126], [0, 0, 5, 5]], np.float32)
  path = str(tmp_path / "val.json")
  with open(path, "w", encoding="utf-8") as f:
    f.write(proposals.dumps({"b.jpg": proposals.entry(boxes[:1], boxes[1:]),
                             "a.jpg": proposals.entry(np.zeros((0, 4)), np.zeros((0, 4)))}))
  got = proposals.read(path)
  assert list(got) == ["a.jpg", "b.jpg"]
  np.testing.assert_allclose(got["b.jpg"]["object_boxes"], boxes[:1], atol=0.006)
  np.testing.assert_allclose(got["b.jpg"]["part_boxes"], boxes[1:], atol=0.006)
  assert got["a.jpg"]["object_boxes"].shape == (0, 4)
