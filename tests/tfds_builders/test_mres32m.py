"""MRES-32M: the sharded JSON-lines layout, its writer, and the Beam builder through `tfds build`.

The builds run the real command line on Beam's FnApiRunner (what the DirectRunner runs when it
does not use Prism, which it would download) with one worker and with two worker processes.
"""

import copy
import glob
import json
import os
import shutil

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest

from tests.files import corrupt_file
from tests.tfds_builders import tfds_cli
from tfds_builders.mres32m import mres32m_dataset_builder as builder
from unires_jax.data import raw_io, schema
from unires_jax.data.records import RecordError
from unires_jax.data.writers import common, mres32m

NAME = "mres32m"
ONE_WORKER = "--beam_pipeline_options=runner=FnApiRunner"
TWO_PROCESSES = ONE_WORKER + ",direct_num_workers=2,direct_running_mode=multi_processing"


def _scenes() -> dict[str, list[common.Scene]]:
  """6 train and 1 val scenes (48x64) with objects, parts, multi/none references; one scene has
  an uncaptioned part (no target) and one has no proposals."""
  rng = np.random.default_rng(0)
  scenes = [common.random_scene(rng, i, first_segment_id=100 * i + 1, first_ref_id=100 * i,
                                first_sent_id=100 * i, multi_and_none=i % 2 == 0,
                                file_name=f"img_{i:03d}.jpg") for i in range(7)]
  scenes[1].refs = [r for r in scenes[1].refs if r.segment_ids != [102]]  # Part 102: no caption.
  scenes[2].object_proposals = scenes[2].part_proposals = None
  return {"train": scenes[:6], "val": scenes[6:]}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp("mres32m_raw"))
  mres32m.write(root, _scenes(), num_shards={"train": 3, "val": 1})
  return root


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory) -> str:
  """The data dir of a one-worker build of `raw`."""
  data_dir = str(tmp_path_factory.mktemp("mres32m_data"))
  tfds_cli.build(NAME, raw, data_dir, ONE_WORKER)
  return data_dir


@pytest.fixture(scope="module")
def built_examples(built, tmp_path_factory) -> dict[str, list[dict]]:
  """`{split: examples}` of the one-worker build, read back by TFDS alone."""
  tmp = tmp_path_factory.mktemp("mres32m_read")
  return {split: _read(built, split, tmp) for split in ("train", "val")}


def _read(data_dir: str, split: str, tmp_path) -> list[dict]:
  """The examples in their stored order (TFDS's, from the hashes of the keys)."""
  return tfds_cli.read_back(NAME, split, data_dir, str(tmp_path))


def _lines(root: str, split: str) -> list[dict]:
  return [json.loads(line) for path in sorted(glob.glob(f"{root}/{split}-*.jsonl"))
          for line in open(path) if line.strip()]


def _xyxy(box) -> list[float]:
  x, y, w, h = box
  return [x, y, x + w, y + h]


def _expected(root: str, line: dict) -> dict:
  """What the example of one raw line must hold, derived from the line alone."""
  extra = line.get("expressions", [])
  referred = {t for e in extra for t in e["targets"]}
  targets, masks, expressions = [], [], []
  for obj in line["objects"]:
    segments = [(obj, obj["category"], "object", {})]
    segments += [(p, f"{obj['category']}:{p['name']}", "part", {"object_id": obj["id"]})
                 for p in obj.get("parts", [])]
    for seg, category, granularity, parent in segments:
      if not seg["captions"] and seg["id"] not in referred:
        continue
      raw = {k: v for k, v in seg.items() if k not in ("mask", "captions", "parts")}
      targets.append({"id": seg["id"], "box": _xyxy(seg["bbox"]), "category": category,
                      "granularity": granularity, "raw": {**raw, **parent}})
      rle = {"size": seg["mask"]["size"], "counts": seg["mask"]["counts"].encode()}
      masks.append(mask_utils.decode(rle))
      expressions += [{"text": c["text"], "id": c["id"], "ref_id": seg["id"],
                       "target_indices": [len(targets) - 1], "granularity": granularity,
                       "no_target": False} for c in seg["captions"]]
  index = {t["id"]: i for i, t in enumerate(targets)}
  for e in extra:
    indices = [index[t] for t in e["targets"]]
    granularity = ("none" if not indices else "multi" if len(indices) > 1
                   else targets[indices[0]]["granularity"])
    expressions.append({"text": e["text"], "id": e["id"], "ref_id": e.get("ref_id", e["id"]),
                        "target_indices": indices, "granularity": granularity,
                        "no_target": not indices})
  proposals = line.get("proposals", {})
  return {
      "image_id": str(line["image_id"]), "file_name": line["file_name"], "targets": targets,
      "masks": masks, "expressions": expressions,
      "image": np.asarray(Image.open(os.path.join(root, "images", line["file_name"]))),
      "object_boxes": [_xyxy(b) for b in proposals.get("object_boxes", [])],
      "part_boxes": [_xyxy(b) for b in proposals.get("part_boxes", [])],
  }


def _assert_matches_raw(examples: list[dict], root: str, split: str) -> None:
  examples = sorted(examples, key=lambda e: e["image_id"])
  expected = sorted((_expected(root, line) for line in _lines(root, split)),
                    key=lambda e: e["image_id"])
  assert [e["image_id"] for e in examples] == [e["image_id"] for e in expected]
  for got, want in zip(examples, expected):
    assert got["file_name"] == want["file_name"]
    np.testing.assert_array_equal(got["image"], want["image"])
    assert got["expressions"] == want["expressions"]
    assert [{**t, "raw": json.loads(t["raw"])} for t in got["targets"]] == want["targets"]
    assert len(got["masks"]) == len(want["masks"])
    for m, w in zip(got["masks"], want["masks"]):
      np.testing.assert_array_equal(m, w)
    np.testing.assert_allclose(got["object_boxes"].reshape(-1, 4),
                               np.reshape(want["object_boxes"], (-1, 4)))
    np.testing.assert_allclose(got["part_boxes"].reshape(-1, 4),
                               np.reshape(want["part_boxes"], (-1, 4)))


def _assert_equal_examples(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      if key == "masks":
        assert len(x[key]) == len(y[key])
        for m, n in zip(x[key], y[key]):
          np.testing.assert_array_equal(m, n)
      elif isinstance(x[key], np.ndarray):
        np.testing.assert_array_equal(x[key], y[key])
      else:
        assert x[key] == y[key], key


def _no_dataset(data_dir: str) -> bool:
  """True when no version folder (what TFDS readers open) is left under the data dir."""
  return not glob.glob(os.path.join(data_dir, NAME, "default", "*", "dataset_info.json"))


# --- The writer and the line conversion, in this process. ---


def test_writer_layout_and_masks(raw):
  assert sorted(os.listdir(raw)) == ["images", "train-00000-of-00003.jsonl",
                                     "train-00001-of-00003.jsonl", "train-00002-of-00003.jsonl",
                                     "val-00000-of-00001.jsonl"]
  scenes = {s.image_id: s for split in _scenes().values() for s in split}
  lines = _lines(raw, "train") + _lines(raw, "val")
  assert sorted(line["image_id"] for line in lines) == sorted(scenes)
  for line in lines:
    scene = scenes[line["image_id"]]
    for obj in line["objects"]:
      for seg in [obj, *obj["parts"]]:
        rle = {"size": seg["mask"]["size"], "counts": seg["mask"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle), scene.segment(seg["id"]).mask)
        counts = raw_io.rle_counts(seg["mask"]["counts"])
        # Runs alternate 0/1 in column-major order, starting with zeros.
        flat = scene.segment(seg["id"]).mask.T.reshape(-1)
        np.testing.assert_array_equal(np.repeat(np.arange(len(counts)) % 2, counts), flat)


def test_find_shards(tmp_path):
  for name in ("train-00000-of-00002.jsonl", "val-00000-of-00001.jsonl", "notes.jsonl"):
    (tmp_path / name).write_text("")
  with pytest.raises(FileNotFoundError, match=r"missing \[1\]"):
    builder.find_shards(str(tmp_path))
  (tmp_path / "train-00001-of-00002.jsonl").write_text("")
  assert builder.find_shards(str(tmp_path)) == {
      "train": [str(tmp_path / f"train-0000{i}-of-00002.jsonl") for i in range(2)],
      "val": [str(tmp_path / "val-00000-of-00001.jsonl")]}
  (tmp_path / "train-00000-of-00003.jsonl").write_text("")
  with pytest.raises(FileNotFoundError, match="disagree"):
    builder.find_shards(str(tmp_path))


def _bad_rle(line):
  line["objects"][0]["mask"]["counts"] = line["objects"][0]["mask"]["counts"][:-3]


def _set(path, value):
  """A mutation setting `line[path[0]][path[1]]... = value`."""
  def mutate(line):
    target = line
    for key in path[:-1]:
      target = target[key]
    target[path[-1]] = value
  return mutate


BAD_LINES = {
    "short RLE": (_bad_rle, "RLE"),
    "RLE counts not a string": (_set(["objects", 0, "mask", "counts"], [3072]), "compressed RLE"),
    "mask size differs": (_set(["objects", 0, "mask"], mres32m.rle(np.ones((8, 8), bool))),
                          "differs from the image"),
    "empty caption": (_set(["objects", 0, "captions", 0, "text"], "  "), "non-empty string"),
    "caption not a string": (_set(["objects", 0, "captions", 0, "text"], 7), "expected str"),
    "box outside": (_set(["objects", 0, "bbox"], [50, 40, 20, 20]), "outside"),
    "proposal outside": (_set(["proposals", "part_boxes"], [[0, 0, 65, 2]]), "outside"),
    "unknown target": (_set(["expressions"], [{"id": 999, "text": "x", "targets": [12345]}]),
                       "no object or part has"),
    "repeated segment id": (_set(["objects", 0, "parts", 0, "id"], 1), "repeat"),
    "missing image": (_set(["file_name"], "absent.jpg"), "does not exist"),
    "size differs": (_set(["height"], 47), "the line says 64x47"),
    "no caption": (lambda line: line.update(objects=[], expressions=[]), "no expression"),
    "missing field": (lambda line: line.pop("objects"), "no field 'objects'"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_line_names_file_and_line(raw, case):
  mutate, message = BAD_LINES[case]
  line = copy.deepcopy(_lines(raw, "train")[0])
  mutate(line)
  where = "train-00000-of-00003.jsonl:1"
  with pytest.raises(RecordError, match=message) as e:
    schema.to_example(builder.to_record(line, os.path.join(raw, "images"), where))
  assert str(e.value).startswith(where)


def test_malformed_line_names_file_and_line():
  with pytest.raises(RecordError, match=r"^s.jsonl:3: malformed JSON line"):
    builder.parse_line(b'{"image_id": 1, \n', "s.jsonl:3")
  with pytest.raises(RecordError, match=r"^s.jsonl:3: a line is a JSON object, got list"):
    builder.parse_line(b"[1, 2]\n", "s.jsonl:3")


def test_good_line_converts(raw):
  line = _lines(raw, "train")[0]
  example = schema.to_example(builder.to_record(line, os.path.join(raw, "images"), "x:1"))
  assert example["image_id"] == str(line["image_id"])


# --- Builds through the `tfds build` command line. ---


@pytest.mark.slow
def test_build_matches_raw_files(raw, built_examples):
  for split, examples in built_examples.items():
    _assert_matches_raw(examples, raw, split)
  train = {e["image_id"]: e for e in built_examples["train"]}
  # The part without a caption is no target; the scene without proposals has none.
  assert 102 not in [t["id"] for t in train["1"]["targets"]]
  assert train["2"]["object_boxes"].shape == (0, 4)
  assert {x["granularity"] for e in train.values() for x in e["expressions"]} == {
      "object", "part", "multi", "none"}


@pytest.mark.slow
def test_two_worker_processes_build_the_same_dataset(raw, built_examples, tmp_path):
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  proc = tfds_cli.build(NAME, raw, data_dir, TWO_PROCESSES)
  # Each SDK worker process logs this once when it starts (the runner relays worker logs to
  # stdout): two processes converted the lines.
  assert proc.stdout.count("Logging handler created") == 2
  for split, examples in built_examples.items():  # Same examples, in the same order.
    _assert_equal_examples(_read(data_dir, split, tmp_path), examples)


@pytest.fixture(scope="module")
def bad_raw(raw, tmp_path_factory) -> dict:
  """`raw` with a malformed JSON line (train shard 1, line 2) and a corrupt JPEG (train shard 0,
  line 1): 7 train lines, 2 bad; `good` are the image ids of the others."""
  root = str(tmp_path_factory.mktemp("mres32m_bad")) + "/raw"
  shutil.copytree(raw, root)
  train = _lines(root, "train")
  corrupt_file(os.path.join(root, "images", train[0]["file_name"]))
  malformed = os.path.join(root, "train-00001-of-00003.jsonl")
  lines = open(malformed).readlines()
  with open(malformed, "w") as f:
    f.writelines([lines[0], '{"image_id": 99, "file_name": \n', *lines[1:]])
  corrupt = os.path.join(root, "train-00000-of-00003.jsonl")
  return {"root": root, "malformed": f"{malformed}:2", "corrupt": f"{corrupt}:1",
          "good": sorted(str(line["image_id"]) for line in train[1:])}


@pytest.mark.slow
def test_corrupt_jpeg_fails_the_build_naming_the_line(raw, tmp_path):
  root = str(tmp_path / "raw")
  shutil.copytree(raw, root)
  shard = os.path.join(root, "val-00000-of-00001.jsonl")
  corrupt_file(os.path.join(root, "images", _lines(root, "val")[0]["file_name"]))
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  proc = tfds_cli.build(NAME, root, data_dir, ONE_WORKER, check=False)
  assert proc.returncode != 0
  assert f"RecordError: {shard}:1: image file" in proc.stderr
  assert "is corrupt or not an image" in proc.stderr
  assert _no_dataset(data_dir)


@pytest.mark.slow
def test_skip_bad_skips_and_counts(bad_raw, tmp_path):
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  config = json.dumps({"name": "default", "skip_bad": True, "max_bad_fraction": 0.5})
  proc = tfds_cli.build(NAME, bad_raw["root"], data_dir, ONE_WORKER, "--config", config)
  log = proc.stdout + proc.stderr
  assert f"Skipping bad record: {bad_raw['malformed']}: malformed JSON line" in log
  assert f"Skipping bad record: {bad_raw['corrupt']}: image file" in log
  assert "MRES-32M train: skipped 2 of 7 records" in log
  assert sorted(e["image_id"] for e in _read(data_dir, "train", tmp_path)) == bad_raw["good"]


@pytest.mark.slow
def test_too_many_bad_records_fail_and_leave_nothing(bad_raw, tmp_path):
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  config = json.dumps({"name": "default", "skip_bad": True, "max_bad_fraction": 0.2})
  proc = tfds_cli.build(NAME, bad_raw["root"], data_dir, ONE_WORKER, "--config", config,
                        check=False)
  assert proc.returncode != 0
  # The count is checked on a side branch of the pipeline; its failure fails the whole build.
  assert "TooManyBadRecords: MRES-32M train: 2 of 7 records are bad" in proc.stderr
  assert _no_dataset(data_dir)
  with pytest.raises(AssertionError, match="reading mres32m/train failed"):
    tfds_cli.read_back(NAME, "train", data_dir, str(tmp_path))
