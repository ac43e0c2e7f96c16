"""RefCOCOm builder: the real `tfds build` command line on raw files in the RefCOCOm layout."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tests.files import corrupt_file
from tests.tfds_builders import tfds_cli
from tfds_builders.ref_coco_m import ref_coco_m_dataset_builder as ref_coco_m
from unires_jax.data import records
from unires_jax.data.writers import common, refcocom

SPLITS = {"val": 3, "testA": 2, "testB": 1}


def _scenes(seed: int, counts: dict[str, int]) -> dict[str, list[common.Scene]]:
  rng = np.random.default_rng(seed)
  out, k = {}, 0
  for split, n in counts.items():
    out[split] = []
    for _ in range(n):
      out[split].append(common.random_scene(
          rng, 100 + k, first_segment_id=1000 * (k + 1), first_ref_id=100 * k,
          first_sent_id=1000 * k, multi_and_none=True))
      k += 1
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("refcocom")
  raw, out = str(root / "raw"), str(root / "out")
  scenes = _scenes(0, SPLITS)
  refcocom.write(raw, scenes)
  tfds_cli.build("ref_coco_m", raw, out)
  return raw, out, scenes, root


def test_cli_build_reads_back_what_the_raw_files_hold(built):
  raw, out, scenes, root = built
  for split, split_scenes in scenes.items():
    examples = tfds_cli.read_back("ref_coco_m", split, out, str(root))
    assert len(examples) == len(split_scenes)
    by_id = {e["image_id"]: e for e in examples}
    for scene in split_scenes:
      ex = by_id[str(scene.image_id)]
      with Image.open(os.path.join(raw, "images", scene.file_name)) as im:
        np.testing.assert_array_equal(ex["image"], np.asarray(im.convert("RGB")))
      # Targets: every referred segment once, its mask equal to the raw PNG pixel for pixel.
      referred = sorted({i for r in scene.refs for i in r.segment_ids})
      assert sorted(t["id"] for t in ex["targets"]) == referred
      for t, mask in zip(ex["targets"], ex["masks"]):
        with Image.open(os.path.join(raw, "masks", f"{t['id']}.png")) as im:
          np.testing.assert_array_equal(mask != 0, np.asarray(im) != 0)
        seg = scene.segment(t["id"])
        assert t["granularity"] == ("part" if seg.part else "object")
        assert t["category"] == (f"{seg.category}:{seg.part}" if seg.part else seg.category)
        x, y, w, h = seg.box_xywh
        np.testing.assert_allclose(t["box"], [x, y, x + w, y + h])
      # Expressions: every sentence, with its targets and granularity.
      expected = []
      for r in scene.refs:
        gran = ("none" if not r.segment_ids else "multi" if len(r.segment_ids) > 1 else
                "part" if scene.segment(r.segment_ids[0]).part else "object")
        expected += [(s, i, r.ref_id, sorted(r.segment_ids), gran, not r.segment_ids)
                     for s, i in zip(r.sentences, r.sent_ids)]
      ids = [t["id"] for t in ex["targets"]]
      got = [(e["text"], e["id"], e["ref_id"], sorted(ids[j] for j in e["target_indices"]),
              e["granularity"], e["no_target"]) for e in ex["expressions"]]
      assert sorted(got) == sorted(expected)
      np.testing.assert_allclose(ex["object_boxes"], scene.object_proposals, atol=1e-4)
      np.testing.assert_allclose(ex["part_boxes"], scene.part_proposals, atol=1e-4)


def test_every_granularity_is_present(built):
  _, out, _, root = built
  grans = {e["granularity"] for ex in tfds_cli.read_back("ref_coco_m", "val", out, str(root))
           for e in ex["expressions"]}
  assert grans == {"object", "part", "multi", "none"}


def _prepare(raw, out, **config):
  builder = ref_coco_m.Builder(
      data_dir=str(out), config=ref_coco_m.builder_lib.BuilderConfig(name="default", **config))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return builder


def _raw(tmp_path, counts=None):
  raw = tmp_path / "raw"
  scenes = _scenes(1, counts or {"val": 3})
  refcocom.write(str(raw), scenes)
  return raw, scenes["val"]


def _edit_annotations(raw, edit):
  path = raw / "annotations" / "val.json"
  records_ = json.loads(path.read_text())
  edit(records_)
  path.write_text(json.dumps(records_))


def _assert_not_loadable(out):
  with pytest.raises(Exception):
    tfds.data_source("ref_coco_m", split="val", data_dir=str(out))
  assert not (out / "ref_coco_m" / "default" / "1.0.0").exists()


@pytest.mark.parametrize("damage, message", [
    ("missing_image", "does not exist"),
    ("corrupt_image", "corrupt"),
    ("missing_mask", "mask file"),
    ("corrupt_mask", "corrupt"),
    ("mask_size", "differs from the image"),
    ("empty_sentence", "non-empty string"),
    ("number_sentence", "non-empty string"),
    ("box_outside", "outside the"),
    ("no_sentences_field", "no field 'sentences'"),
])
def test_bad_record_is_named_and_nothing_is_left(tmp_path, damage, message):
  raw, scenes = _raw(tmp_path)
  scene = scenes[1]
  seg = scene.refs[0].segment_ids[0]
  if damage == "missing_image":
    os.remove(raw / "images" / scene.file_name)
  elif damage == "corrupt_image":
    corrupt_file(str(raw / "images" / scene.file_name))
  elif damage == "missing_mask":
    os.remove(raw / "masks" / f"{seg}.png")
  elif damage == "corrupt_mask":
    corrupt_file(str(raw / "masks" / f"{seg}.png"))
  elif damage == "mask_size":
    common.write_png(str(raw / "masks" / f"{seg}.png"), np.zeros((5, 7), np.uint8))
  else:
    def edit(recs):
      rec = next(r for r in recs if r["img_name"] == scene.file_name)
      if damage == "empty_sentence":
        rec["sentences"][0]["sent"] = "  "
      elif damage == "number_sentence":
        rec["sentences"][0]["sent"] = 5
      elif damage == "box_outside":
        rec["bbox"] = [10.0, 10.0, 500.0, 20.0]
      else:
        del rec["sentences"]
    _edit_annotations(raw, edit)
  with pytest.raises(records.RecordError, match=message) as info:
    _prepare(raw, tmp_path / "out")
  assert scene.file_name in str(info.value) or "record" in str(info.value)
  assert "val.json" in str(info.value)
  _assert_not_loadable(tmp_path / "out")


def test_skip_bad_counts_and_still_fails_past_the_fraction(tmp_path):
  raw, scenes = _raw(tmp_path)
  corrupt_file(str(raw / "images" / scenes[0].file_name))
  builder = _prepare(raw, tmp_path / "out", skip_bad=True, max_bad_fraction=0.4)
  assert builder.info.splits["val"].num_examples == 2
  with pytest.raises(records.TooManyBadRecords, match="1 of 3 records"):
    _prepare(raw, tmp_path / "out2", skip_bad=True, max_bad_fraction=0.2)
  assert not (tmp_path / "out2" / "ref_coco_m" / "default" / "1.0.0").exists()


def test_skip_bad_from_the_command_line(tmp_path):
  raw, scenes = _raw(tmp_path)
  os.remove(raw / "images" / scenes[2].file_name)
  out = tmp_path / "out"
  failed = tfds_cli.build("ref_coco_m", str(raw), str(out), check=False)
  assert failed.returncode != 0 and scenes[2].file_name in failed.stderr
  tfds_cli.build("ref_coco_m", str(raw), str(out), "--config",
                 '{"name": "default", "skip_bad": true, "max_bad_fraction": 0.5}')
  assert len(tfds.data_source("ref_coco_m", split="val", data_dir=str(out))) == 2


def test_missing_annotations_folder_is_a_clear_error(tmp_path):
  (tmp_path / "raw" / "images").mkdir(parents=True)  # Annotations not unpacked.
  with pytest.raises(FileNotFoundError, match="annotations holds none of"):
    _prepare(tmp_path / "raw", tmp_path / "out")


def test_malformed_annotation_file_names_it(tmp_path):
  raw, _ = _raw(tmp_path)
  (raw / "annotations" / "val.json").write_text("[{\"img_name\": ")
  with pytest.raises(records.RecordError, match="val.json: malformed JSON"):
    _prepare(raw, tmp_path / "out")


def test_tfrecord_build_reads_with_tfds_load(tmp_path):
  # ArrayRecord is the default (random access for Grain); tf.data users build TFRecord instead.
  raw, scenes = _raw(tmp_path)
  builder = ref_coco_m.Builder(data_dir=str(tmp_path / "out"), file_format="tfrecord")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  examples = list(tfds.load("ref_coco_m", split="val", data_dir=str(tmp_path / "out")))
  assert len(examples) == len(scenes)
  sentences = {s for scene in scenes for ref in scene.refs for s in ref.sentences}
  assert {t.decode() for ex in examples for t in ex["expressions"]["text"].numpy()} == sentences
  assert all(ex["targets"]["mask"].shape[1:] == (48, 64, 1) for ex in examples)
