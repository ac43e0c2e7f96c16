"""unires-propose on a raw RefCOCOm directory written by the project's writer, with a random-weight
tiny OWLv2: the file parses, the builder stores its boxes, boxes lie in their images; two
processes give the file one gives; an interrupted run, rerun, gives it too; bad images."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tests.cli_runner import one_error_line, run_cli  # pylint: disable=unused-import
from tests.files import corrupt_file
from tests.owlv2_files import write_tiny_detector
from tests.repo import ROOT
from unires_jax import propose
from unires_jax.config_lib import load_config
from unires_jax.data import build, proposals, raw_images, shapes_parts
from unires_jax.data.writers import refcocom

NUM_IMAGES, SHARD = 7, 3  # shards of 3, 3 and 1 images


def _config():
  cfg = load_config("tiny").proposals
  # One token per character in the tiny tokenizer (16 positions): short queries.
  cfg.update(query_template="{part}", part_vocabulary=("head", "wheel", "door"), batch_size=8,
             object_k=4, part_k=3, part_min_score=0.0, shard_images=SHARD)
  return cfg


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> str:
  return write_tiny_detector(str(tmp_path_factory.mktemp("owlv2")))


@pytest.fixture(scope="module")
def detector(detector_dir):
  return propose.Detector.from_pretrained(detector_dir, _config())


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
  """A RefCOCOm val split of ShapesParts scenes of several sizes, without proposals."""
  root = str(tmp_path_factory.mktemp("raw"))
  scenes = [s for size in (96, 64) for s in shapes_parts.generate(
      4, seed=size, image_size=size, first_image_id=size * 100)][:NUM_IMAGES]
  refcocom.write(root, {"val": scenes}, with_proposals=False)
  return root


def _copy(raw: str, tmp_path) -> str:
  out = str(tmp_path / "raw")
  shutil.copytree(raw, out)
  return out


def _propose(detector, detector_dir, root, **kwargs) -> propose.Summary:
  return propose.propose_split(
      detector, "ref_coco_m", root, "val", builder_config=None,
      settings_record=propose.settings(detector_dir, _config()), shard_images=SHARD, **kwargs)


@pytest.fixture(scope="module")
def one_process(detector, detector_dir, raw, tmp_path_factory) -> str:
  """RAW with the proposal file of one process; returns RAW."""
  root = _copy(raw, tmp_path_factory.mktemp("one"))
  summary = _propose(detector, detector_dir, root)
  assert summary.path == proposals.path(root, "ref_coco_m", "val")
  assert (summary.shards_done, summary.shards_skipped, summary.images) == (3, 0, NUM_IMAGES)
  return root


def _file_bytes(root: str) -> bytes:
  with open(proposals.path(root, "ref_coco_m", "val"), "rb") as f:
    return f.read()


def test_the_file_parses_and_its_boxes_lie_in_their_images(one_process):
  found = proposals.read(proposals.path(one_process, "ref_coco_m", "val"))
  images = raw_images.images("ref_coco_m", one_process, "val")
  assert sorted(found) == sorted(name for name, _ in images) and len(found) == NUM_IMAGES
  cfg = _config()
  for name, path in images:
    with Image.open(path) as im:
      width, height = im.size
    boxes = found[name]
    assert 0 < len(boxes["object_boxes"]) <= cfg.object_k, name
    assert 0 < len(boxes["part_boxes"]) <= cfg.part_k, name
    for key in proposals.KEYS:
      b = boxes[key]
      assert (b[:, :2] >= 0).all() and (b[:, 2] <= width + 0.01).all(), (name, key, b)
      assert (b[:, 3] <= height + 0.01).all() and (b[:, 2:] >= b[:, :2]).all(), (name, key, b)


def test_the_builder_stores_the_proposals(one_process, tmp_path):
  data_dir = str(tmp_path / "tfds")
  build.prepare("ref_coco_m", manual_dir=one_process, data_dir=data_dir)
  found = proposals.read(proposals.path(one_process, "ref_coco_m", "val"))
  source = tfds.data_source("ref_coco_m", split="val", data_dir=data_dir)
  assert len(source) == NUM_IMAGES
  for example in source:
    name = example["file_name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    for key in proposals.KEYS:
      np.testing.assert_allclose(example["proposals"][key], found[name][key], atol=1e-4,
                                 err_msg=f"{name} {key}")


def test_two_processes_give_the_file_of_one(detector, detector_dir, raw, one_process, tmp_path):
  root = _copy(raw, tmp_path)
  first = _propose(detector, detector_dir, root, process_index=1, process_count=2)
  assert first.path is None and first.shards_done == 1  # shard 1 of 0, 1, 2; 0 and 2 missing
  second = _propose(detector, detector_dir, root, process_index=0, process_count=2)
  assert second.path is not None and second.shards_done == 2
  assert _file_bytes(root) == _file_bytes(one_process)


def test_an_interrupted_run_rerun_gives_the_same_file(detector, detector_dir, raw, one_process,
                                                      tmp_path):
  root = _copy(raw, tmp_path)
  calls = []

  def dies_on_the_second_shard(images):
    calls.append(len(images))
    if len(calls) == 2:
      raise KeyboardInterrupt  # as a kill between two shards
    return detector(images)

  with pytest.raises(KeyboardInterrupt):
    _propose(dies_on_the_second_shard, detector_dir, root)
  target = proposals.path(root, "ref_coco_m", "val")
  assert not os.path.exists(target)
  assert sorted(os.listdir(target + ".shards")) == ["00000-of-00003.json", "settings.json"]
  rerun = _propose(detector, detector_dir, root)
  assert (rerun.shards_done, rerun.shards_skipped) == (2, 1)
  assert _file_bytes(root) == _file_bytes(one_process)

  # Shards made with other settings are not mixed in.
  other = _config()
  other.object_k = 2
  with pytest.raises(ValueError, match=r"val.json.shards holds shards made with other settings"):
    propose.propose_split(detector, "ref_coco_m", root, "val", builder_config=None,
                          settings_record=propose.settings(detector_dir, other),
                          shard_images=SHARD)


def test_a_bad_image_stops_naming_it_or_is_skipped_and_counted(detector, detector_dir, raw,
                                                               tmp_path):
  root = _copy(raw, tmp_path)
  name, path = raw_images.images("ref_coco_m", root, "val")[4]  # in the second shard
  corrupt_file(path)
  with pytest.raises(ValueError, match=rf"image .*{name} cannot be read .*--skip_bad"):
    _propose(detector, detector_dir, root)
  assert sorted(os.listdir(proposals.path(root, "ref_coco_m", "val") + ".shards")) == [
      "00000-of-00003.json", "settings.json"]  # the finished shard stays
  summary = _propose(detector, detector_dir, root, skip_bad=True)
  assert summary.bad_images == [name] and summary.shards_skipped == 1
  found = proposals.read(summary.path)
  assert name not in found and len(found) == NUM_IMAGES - 1


@pytest.mark.slow
def test_cli_two_processes_skipping_a_bad_image(detector_dir, raw, one_process, tmp_path):
  root = _copy(raw, tmp_path)
  bad, path = raw_images.images("ref_coco_m", root, "val")[4]
  corrupt_file(path)
  sets = [f"--config.proposals.{k}={v}" for k, v in (
      ("query_template", "{part}"), ("batch_size", 8), ("object_k", 4), ("part_k", 3),
      ("part_min_score", 0.0), ("shard_images", SHARD))]
  command = [sys.executable, "-m", "unires_jax.cli.propose", "--config=configs/tiny.py",
             f"--detector={detector_dir}", f"--manual_dir={root}", "--split=val",
             "--config.proposals.part_vocabulary=('head', 'wheel', 'door')", "--progress=false",
             "--num_processes=2", "--skip_bad", *sets]
  runs = [subprocess.Popen([*command, f"--process_id={i}"], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [run.communicate(timeout=600) for run in runs]
  for run, (out, err) in zip(runs, outputs):
    assert run.returncode == 0, out + err[-3000:]
  assert any("wrote " in out for out, _ in outputs)
  assert any("1 unreadable" in out for out, _ in outputs)
  expected = json.loads(_file_bytes(one_process))
  del expected[bad]
  assert json.loads(_file_bytes(root)) == expected
  with open(proposals.path(root, "ref_coco_m", "val") + ".shards/settings.json",
            encoding="utf-8") as f:
    assert json.load(f)["proposals"]["part_vocabulary"] == ["head", "wheel", "door"]


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size=0 must be >= 1"),
    ("part_nms_iou", 1.5, r"part_nms_iou=1.5 must lie in \[0, 1\]"),
    ("query_template", "a photo of a", "has no {part}"),
    ("part_vocabulary", (), "part_vocabulary is empty but part_k > 0"),
])
def test_settings_out_of_range_are_refused_by_name(field, value, message):
  cfg = _config()
  cfg[field] = value
  with pytest.raises(ValueError, match=rf"config.proposals.{field}.*{message}|{message}"):
    propose.check_config(cfg)


def test_a_rerun_with_other_weights_of_the_same_size_stops_naming_both(
    detector_dir, one_process, tmp_path):
  """The issue's case: same config.json, same file sizes, other weights. A copy of the same
  detector elsewhere is the same detector."""
  root = _copy(one_process, tmp_path)
  shard_dir = proposals.path(root, "ref_coco_m", "val") + ".shards"
  os.remove(os.path.join(shard_dir, "00001-of-00003.json"))
  other = write_tiny_detector(str(tmp_path / "other"), seed=1)
  for name in ("config.json", "model.safetensors"):
    assert os.path.getsize(os.path.join(other, name)) == os.path.getsize(
        os.path.join(detector_dir, name))
  with open(os.path.join(other, "config.json"), "rb") as a, open(
      os.path.join(detector_dir, "config.json"), "rb") as b:
    assert a.read() == b.read()

  def never(images):
    raise AssertionError("no shard may be proposed with other weights")

  with pytest.raises(ValueError) as error:
    propose.propose_split(never, "ref_coco_m", root, "val", builder_config=None,
                          settings_record=propose.settings(other, _config()),
                          shard_images=SHARD)
  message = str(error.value)
  assert message.startswith(f"{shard_dir} holds shards made with other settings: ")
  assert f"the detector {detector_dir}" in message and f"this run's {other}" in message
  assert "model.safetensors" in message
  assert sorted(os.listdir(shard_dir)) == ["00000-of-00003.json", "00002-of-00003.json",
                                           "settings.json"]

  moved = shutil.copytree(detector_dir, tmp_path / "moved")
  calls = []
  summary = propose.propose_split(
      lambda images: calls.append(len(images)) or [propose.ImageProposals(
          np.zeros((1, 4), np.float32), np.zeros((0, 4), np.float32))] * len(images),
      "ref_coco_m", root, "val", builder_config=None,
      settings_record=propose.settings(str(moved), _config()), shard_images=SHARD)
  assert (summary.shards_done, summary.shards_skipped, calls) == (1, 2, [SHARD])


def test_cli_a_bad_raw_file_is_one_line(run_cli, detector_dir, raw, tmp_path):
  """A malformed annotation file (a record error) ends unires-propose with one line naming it."""
  root = _copy(raw, tmp_path)
  annotations = os.path.join(root, "annotations", "val.json")
  with open(annotations, "r+b") as f:
    f.truncate(os.path.getsize(annotations) // 2)
  status, _, err = run_cli("propose", f"--detector={detector_dir}", f"--manual_dir={root}",
                           "--split=val", "--config=configs/tiny.py", "--progress=false")
  assert status == 2
  assert one_error_line("propose", err).startswith(f"{annotations}: ")
