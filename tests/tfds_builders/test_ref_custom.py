"""Your own data (tfds_builders/ref_custom): a folder written by the project's writer in every mask
format and both reference formats, with split names of its own, builds into the shared schema;
`unires-data check` lists every seeded problem of a broken folder in one run, each with file and
line; the build stops at the first or skips and counts; and a built dataset exported to the
folder and built again gives the same examples."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.cli_runner import run_cli  # pylint: disable=unused-import
from unires_jax.data import build, export, pipeline, raw_io, shapes_parts
from unires_jax.data.records import RecordError, TooManyBadRecords
from unires_jax.data.writers import common
from unires_jax.data.writers import ref_custom as writer

# image id -> split; split names of the user's choosing. Image i: segments 100 i + (0..5) (three
# objects, each with its top half as a part), refs 10 i + (0..7): one per segment, one to two
# objects, one to nothing; 2 sentences each.
SPLITS = {"train": [1, 2], "my-val": [3], "heldout": [4]}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """(root, {image id: Scene}); refs/heldout.json is a list (a record over several lines), the
  other splits JSON lines."""
  rng = np.random.default_rng(3)
  scenes = {i: common.random_scene(rng, i, multi_and_none=True, first_segment_id=100 * i,
                                   first_ref_id=10 * i, first_sent_id=100 * i,
                                   file_name=f"photos/im{i}.jpg")
            for ids in SPLITS.values() for i in ids}
  root = str(tmp_path_factory.mktemp("raw"))
  writer.write(root, {s: [scenes[i] for i in ids] for s, ids in SPLITS.items()})
  jsonl = os.path.join(root, "refs", "heldout.jsonl")
  with open(jsonl) as f:
    records = [json.loads(line) for line in f]
  os.remove(jsonl)
  with open(os.path.join(root, "refs", "heldout.json"), "w") as f:
    json.dump(records, f, indent=1)
  return root, scenes


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("built"))
  build.prepare("ref_custom", manual_dir=raw[0], data_dir=data_dir)
  return data_dir


def read(name: str, split: str, data_dir: str) -> dict[str, dict]:
  """image id -> the example as plain values: image `[H, W, 3]`, targets by id (mask `[H, W]`),
  expressions by id, proposals."""
  source = pipeline.open_source(name, split, data_dir)
  out = {}
  for i in range(len(source)):
    ex = source[i]
    t, e = ex["targets"], ex["expressions"]
    ids = [int(v) for v in t["id"]]
    out[ex["image_id"].decode()] = {
        "file_name": ex["file_name"].decode(), "image": ex["image"],
        "targets": {ids[j]: {"mask": t["mask"][j][..., 0], "box": t["box"][j],
                             "category": t["category"][j].decode(),
                             "granularity": int(t["granularity"][j])} for j in range(len(ids))},
        "expressions": {int(e["id"][k]): (e["text"][k].decode(), int(e["ref_id"][k]),
                                          sorted(ids[i] for i in e["target_indices"][k]),
                                          int(e["granularity"][k]), bool(e["no_target"][k]))
                        for k in range(len(e["id"]))},
        "proposals": (ex["proposals"]["object_boxes"], ex["proposals"]["part_boxes"])}
  return out


def test_builds_every_split_as_the_raw_folder_holds_it(raw, built):
  root, scenes = raw
  with open(os.path.join(root, "instances.json")) as f:
    anns = {a["id"]: a for a in json.load(f)["annotations"]}
  kinds = set()
  for split, image_ids in SPLITS.items():
    got = read("ref_custom", split, built)
    assert sorted(got) == [str(i) for i in image_ids]
    for image_id in image_ids:
      ex, scene = got[str(image_id)], scenes[image_id]
      assert ex["file_name"] == scene.file_name
      with Image.open(os.path.join(root, "images", scene.file_name)) as im:
        np.testing.assert_array_equal(ex["image"], np.asarray(im))
      assert sorted(ex["targets"]) == sorted(s.id for s in scene.segments)
      for seg in scene.segments:
        t = ex["targets"][seg.id]
        np.testing.assert_array_equal(t["mask"], seg.mask.astype(np.uint8))
        x, y, w, h = seg.box_xywh
        np.testing.assert_allclose(t["box"], [x, y, x + w, y + h])
        assert t["category"] == (f"{seg.category}:{seg.part}" if seg.part else seg.category)
        assert t["granularity"] == (1 if seg.part else 0)  # object, part
        a = anns[seg.id]
        kinds.add("png" if "mask_file" in a else "polygon" if isinstance(
            a["segmentation"], list) else "rle" if isinstance(a["segmentation"]["counts"], str)
                  else "uncompressed_rle")
      want = {}
      for ref in scene.refs:
        n = len(ref.segment_ids)
        granularity = (3 if n == 0 else 2 if n > 1 else  # none, multi
                       1 if scene.segment(ref.segment_ids[0]).part else 0)
        for sent_id, text in zip(ref.sent_ids, ref.sentences):
          want[sent_id] = (text, ref.ref_id, sorted(ref.segment_ids), granularity, n == 0)
      assert ex["expressions"] == want
      np.testing.assert_allclose(ex["proposals"][0], scene.object_proposals, atol=0.01)
      np.testing.assert_allclose(ex["proposals"][1], scene.part_proposals, atol=0.01)
  assert kinds == {"polygon", "rle", "uncompressed_rle", "png"}


def _line_of(path: str, text: str) -> int:
  """The line of `path` that first holds `text`."""
  with open(path) as f:
    return next(n for n, line in enumerate(f, 1) if text in line)


def _rewrite_ref(path: str, which: int, **changes) -> int:
  """Changes the ref with ref_id `which` of a JSON-lines file; returns its line."""
  with open(path) as f:
    lines = f.read().splitlines()
  n = next(n for n, line in enumerate(lines) if json.loads(line)["ref_id"] == which)
  lines[n] = json.dumps({**json.loads(lines[n]), **changes})
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return n + 1


def _break(root: str) -> list[tuple[str, int, str]]:
  """Seeds one problem of each kind into a copy of the raw folder; returns what the checker must
  say for each: (file relative to root, line, a part of the message)."""
  instances, train = os.path.join(root, "instances.json"), os.path.join(root, "refs/train.jsonl")
  with open(instances) as f:
    coco = json.load(f)
  anns = {a["id"]: a for a in coco["annotations"]}
  anns[100]["segmentation"] = [[0, 0, 70, 0, 70, 10, 0, 10]]  # the image is 64 wide
  anns[102]["segmentation"] = {"size": [10, 10], "counts": [100]}
  coco["annotations"].append(dict(anns[204]))  # a duplicate id
  with open(instances, "w") as f:
    f.write(writer.instances_text(coco))
  assert "mask_file" in anns[103]
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(root, anns[103]["mask_file"]))
  os.remove(os.path.join(root, "images", "photos", "im3.jpg"))
  with open(os.path.join(root, "refs", "my-val.jsonl"), "a") as f:
    f.write('{"ref_id": 39, "image_id": 3,\n')
  heldout = os.path.join(root, "refs", "heldout.json")
  with open(heldout) as f:
    records = json.load(f)
  records[1]["sentences"][1] = " "
  with open(heldout, "w") as f:
    json.dump(records, f, indent=1)

  def at_instances(marker: str) -> int:
    return _line_of(instances, marker)

  first_204, first_ref_20 = at_instances('{"id": 204,'), _line_of(train, '"ref_id": 20,')
  return [
      ("instances.json", at_instances('{"id": 100,'), "mask outside the image: polygon point "
       "(70, 0) lies outside the 64x48 image"),
      ("instances.json", at_instances('{"id": 102,'), "mask outside the image: RLE size "
       "[10, 10] differs from the image's [48, 64]"),
      ("instances.json", len(coco["images"]) + len(coco["annotations"]) + 3,
       f"duplicate annotation id 204: also on line {first_204}"),
      ("instances.json", at_instances('{"id": 103,'), "mask outside the image: mask file "),
      ("instances.json", at_instances('{"id": 3,'), "image file "),
      ("refs/train.jsonl", _rewrite_ref(train, 12, ann_ids=[999]), "unknown annotation id 999"),
      ("refs/train.jsonl", _rewrite_ref(train, 14, sentences=["object 2 left", ""]),
       "empty sentence: sentences[1] is ''"),
      ("refs/train.jsonl", _rewrite_ref(train, 15, ann_ids=[200], part=False),
       "annotation 200 is on image 2, not on image 1"),
      ("refs/train.jsonl", _rewrite_ref(train, 21, ref_id=20),
       f"ref_id 20 is also on {train}:{first_ref_20}, ref 20"),
      ("refs/train.jsonl", _rewrite_ref(train, 22, image_id=77), "unknown image_id 77"),
      ("refs/train.jsonl", _rewrite_ref(train, 23, note="x"), "unknown field(s) ['note']"),
      ("refs/train.jsonl", _rewrite_ref(train, 26, part=[False, True]),
       "annotation 202 is a part here and an object on"),
      ("refs/my-val.jsonl", _line_of(os.path.join(root, "refs", "my-val.jsonl"), '"ref_id": 39'),
       "malformed JSON"),
      # The record's first line, its "{" (json.dump's indent puts ref_id on the next).
      ("refs/heldout.json", _line_of(heldout, '"ref_id": 41') - 1,
       "empty sentence: sentences[1]"),
  ]


@pytest.fixture
def broken(raw, tmp_path) -> tuple[str, list]:
  root = str(tmp_path / "broken")
  shutil.copytree(raw[0], root)
  return root, _break(root)


def test_check_lists_every_problem_with_file_and_line(broken, run_cli):
  root, expected = broken
  status, out, _ = run_cli("data", "check", f"--manual_dir={root}")
  assert status == 1
  lines = out.strip().splitlines()
  assert lines[-1].startswith(f"{len(expected)} problem(s) in {root}; good: heldout: 7 "
                              "references on 1 images, my-val: 8 references on 0 images, train:")
  problems = lines[:-1]
  assert len(problems) == len(expected), "\n".join(problems)
  for file, line, message in expected:
    prefix = f"{os.path.join(root, file)}:{line}"
    found = [p for p in problems if p.startswith(prefix + ",") or p.startswith(prefix + ":")]
    assert len(found) == 1 and message in found[0], (prefix, message, problems)


def test_check_of_a_good_folder_passes(raw, run_cli):
  status, out, _ = run_cli("data", "check", f"--manual_dir={raw[0]}")
  assert status == 0
  assert out.strip() == (f"0 problem(s) in {raw[0]}; good: heldout: 8 references on 1 images, "
                         "my-val: 8 references on 1 images, train: 16 references on 2 images")


def test_build_stops_at_a_bad_record_or_skips_and_counts(broken, raw, tmp_path, caplog):
  root, expected = broken
  data_dir = str(tmp_path / "out")
  heldout = next(e for e in expected if e[0] == "refs/heldout.json")
  with pytest.raises(RecordError, match=f"heldout.json:{heldout[1]}, ref 41: empty sentence"):
    build.prepare("ref_custom", manual_dir=root, data_dir=data_dir)
  assert not os.path.exists(os.path.join(data_dir, "ref_custom", "default", "1.0.0"))
  # The malformed JSON line stops a build whatever the policy; the rest is skipped and counted.
  with open(os.path.join(root, "refs", "my-val.jsonl")) as f:
    lines = f.read().splitlines()
  with open(os.path.join(root, "refs", "my-val.jsonl"), "w") as f:
    f.write("\n".join(lines[:-1]) + "\n")
  with pytest.raises(TooManyBadRecords, match="ref_custom my-val: 1 of 1 records are bad"):
    build.prepare("ref_custom", manual_dir=root, data_dir=data_dir, skip_bad=True,
                  max_bad_fraction=0.4)
  # TFDS writes no empty split: my-val gets its image back.
  shutil.copy(os.path.join(raw[0], "images", "photos", "im3.jpg"),
              os.path.join(root, "images", "photos", "im3.jpg"))
  with caplog.at_level(logging.WARNING):
    build.prepare("ref_custom", manual_dir=root, data_dir=data_dir, skip_bad=True,
                  max_bad_fraction=1.0)
  log = caplog.text
  assert f"{root}/refs/heldout.json: skipped 1 of 8 records" in log
  # Stopping at a record's first problem: refs 10, 12, 14, 15, 16, 21, 22, 23 and 24.
  assert f"{root}/refs/train.jsonl: skipped 9 of 16 records" in log
  assert "ref_custom train: skipped 1 of 2 records" in log  # image 1: mask 103's size
  got = read("ref_custom", "train", data_dir)
  assert sorted(got) == ["2"]
  # Left out: 201 (ref 21, a duplicate ref_id), 203 (ref 23), 204 (an id twice).
  assert sorted(got["2"]["targets"]) == [200, 202, 205]
  assert sorted(read("ref_custom", "my-val", data_dir)) == ["3"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
  """A small ShapesParts (3 train, 2 val images) built as ref_coco_m."""
  root = tmp_path_factory.mktemp("shapes")
  shapes_parts.write(str(root / "raw"), num_train=3, num_val=2, seed=0, image_size=96)
  build.prepare("ref_coco_m", manual_dir=str(root / "raw"), data_dir=str(root / "tfds"))
  return str(root / "tfds")


def test_export_then_build_gives_the_same_examples(shapes, tmp_path, run_cli):
  out = str(tmp_path / "exported")
  cuts = {"train": "train[:2]", "heldout": "train[2:]+val"}
  status, stdout, err = run_cli("data", "export", "--name=ref_coco_m", f"--data_dir={shapes}",
                                f"--out={out}", "--splits=" + ",".join(
                                    f"{k}={v}" for k, v in cuts.items()))
  assert status == 0, err
  assert stdout.strip() == f"wrote {out}: train 2 images, heldout 3 images"
  assert sorted(os.listdir(os.path.join(out, "refs"))) == ["heldout.jsonl", "train.jsonl"]
  data_dir = str(tmp_path / "tfds")
  build.prepare("ref_custom", manual_dir=out, data_dir=data_dir)
  granularities = set()
  for split, spec in cuts.items():
    want, got = read("ref_coco_m", spec, shapes), read("ref_custom", split, data_dir)
    assert sorted(got) == sorted(want) and got
    for image_id, w in want.items():
      g = got[image_id]
      assert g["file_name"] == w["file_name"]
      np.testing.assert_array_equal(g["image"], w["image"])
      assert g["expressions"] == w["expressions"]
      granularities |= {e[3] for e in w["expressions"].values()}
      assert sorted(g["targets"]) == sorted(w["targets"])
      for ann_id, t in w["targets"].items():
        np.testing.assert_array_equal(g["targets"][ann_id]["mask"], t["mask"])
        np.testing.assert_allclose(g["targets"][ann_id]["box"], t["box"], atol=1e-4)
        assert (g["targets"][ann_id]["category"], g["targets"][ann_id]["granularity"]) == (
            t["category"], t["granularity"])
      for mine, theirs in zip(g["proposals"], w["proposals"]):
        np.testing.assert_allclose(mine, theirs, atol=0.01)
  assert granularities == {0, 1, 2, 3}  # object, part, multi, none all went round


def test_export_as_png_and_refusals(built, raw, tmp_path):
  out = str(tmp_path / "png")
  assert export.export("ref_custom", built, out, {"val": "my-val"}, mask_format="png") == {
      "val": 1}
  with open(os.path.join(out, "instances.json")) as f:
    coco = json.load(f)
  scene = raw[1][3]
  assert sorted(a["id"] for a in coco["annotations"]) == sorted(s.id for s in scene.segments)
  for a in coco["annotations"]:
    np.testing.assert_array_equal(raw_io.read_mask_png(os.path.join(out, a["mask_file"]), "x"),
                                  scene.segment(a["id"]).mask)
  with pytest.raises(FileExistsError):
    export.export("ref_custom", built, out, {"val": "my-val"})
  with pytest.raises(ValueError, match=r"split names \['a b'\] are not of"):
    export.export("ref_custom", built, str(tmp_path / "x"), {"a b": "train"})
  assert not os.path.exists(tmp_path / "x")


_ELSEWHERE = r"""
import sys
import numpy as np
import tensorflow_datasets as tfds
data_dir, version_dir, out = sys.argv[1:4]
info_splits = sorted(tfds.builder_from_directory(version_dir).info.splits)
arrays = {}
for split in info_splits:
  source = tfds.data_source("ref_custom", split=split, data_dir=data_dir)
  for i in range(len(source)):
    ex = source[i]
    key = f"{split}/{ex['image_id'].decode()}"
    arrays[f"{key}/image"] = ex["image"]
    for j, (ann_id, mask) in enumerate(zip(ex["targets"]["id"], ex["targets"]["mask"])):
      arrays[f"{key}/mask/{int(ann_id)}"] = mask[..., 0]
bad = [m for m in ("unires_jax", "tensorflow") if m in sys.modules]
assert not bad, bad
np.savez(out, **arrays)
"""


def _pip_install(python: str, *packages: str) -> None:
  run = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *packages], capture_output=True, text=True, timeout=900, check=False)
  assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_loads_in_an_environment_with_tensorflow_datasets_alone(built, tmp_path):
  """A new virtual environment with tensorflow-datasets and array-record from the package
  registry (not this package), then pillow (TFDS decodes images with it): about 19 s and 17
  CPU-s on 2 cores with a warm pip cache."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
  python = str(venv / "bin" / "python")
  _pip_install(python, "tensorflow-datasets", "array-record")

  def read_there():
    out = str(tmp_path / "read.npz")
    return out, subprocess.run(
        [python, "-c", _ELSEWHERE, built, pipeline.dataset_dir("ref_custom", built), out],
        capture_output=True, text=True, cwd=tmp_path, check=False,
        env={"PATH": os.environ["PATH"], "TF_CPP_MIN_LOG_LEVEL": "3"})

  # TFDS decodes images in NumPy with PIL or OpenCV, neither of which it requires.
  _, run = read_there()
  assert run.returncode == 1 and "requires either OpenCV or PIL" in run.stderr, run.stderr[-3000:]
  _pip_install(python, "pillow")
  out, run = read_there()
  assert run.returncode == 0, run.stderr[-3000:]
  with np.load(out) as f:
    got = {k: f[k] for k in f.files}
  want = {}
  for split in SPLITS:
    for image_id, ex in read("ref_custom", split, built).items():
      want[f"{split}/{image_id}/image"] = ex["image"]
      want.update({f"{split}/{image_id}/mask/{a}": t["mask"] for a, t in ex["targets"].items()})
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_unires_propose_finds_the_images_of_a_split(raw):
  from unires_jax.data import raw_images  # pylint: disable=g-import-not-at-top

  root = raw[0]
  assert raw_images.images("ref_custom", root, "train") == [
      (f"photos/im{i}.jpg", os.path.join(root, "images", "photos", f"im{i}.jpg")) for i in (1, 2)]
  with pytest.raises(RecordError, match=r"refs: no split 'val'; it has \['heldout', 'my-val', "
                     r"'train'\]"):
    raw_images.images("ref_custom", root, "val")
