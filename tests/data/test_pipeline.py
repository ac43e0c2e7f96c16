"""The Grain input pipeline on a RefCOCOm-layout dataset built by the real builder."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from unires_jax import models
from tests.repo import ROOT as REPO_ROOT
from unires_jax.config_lib import load_config
from unires_jax.data import build, pipeline, preprocess, tokenizer
from unires_jax.data.writers import common, refcoco, refcocom
from unires_jax.models.unires import INPUT_KEYS, LOSS_KEYS, compute_loss

SPLITS = {"val": 4, "testA": 2, "testB": 2}  # testB is written without proposals.


def _scenes():
  rng = np.random.default_rng(3)
  out, k = {}, 0
  for split, n in SPLITS.items():
    out[split] = [common.random_scene(rng, 500 + i + k, first_segment_id=1000 * (i + k + 1),
                                      first_ref_id=100 * (i + k), first_sent_id=1000 * (i + k),
                                      multi_and_none=True) for i in range(n)]
    k += n
  return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  scenes = _scenes()
  raw, out = str(root / "raw"), str(root / "tfds")
  refcocom.write(raw, {k: v for k, v in scenes.items() if k != "testB"})
  refcocom.write(raw, {"testB": scenes["testB"]}, with_proposals=False)
  build.prepare("ref_coco_m", manual_dir=raw, data_dir=out)
  config = _config(out)
  texts = [s for split in scenes.values() for sc in split for r in sc.refs for s in r.sentences]
  tok = tokenizer.train_tokenizer(texts + [config.input.template, config.input.answer],
                                  vocab_size=config.model.llm.vocab_size,
                                  out_dir=str(root / "tokenizer"))
  return {"scenes": scenes, "raw": raw, "out": out, "tokenize": tokenizer.hf_tokenize(tok),
          "tokenizer_dir": str(root / "tokenizer")}


def _config(data_dir, **train):
  config = load_config("tiny")
  config.input.update(data_dir=data_dir, global_batch_size=4, num_threads=2, prefetch_images=4,
                      shuffle_window=8, seed=0)
  config.input.train = train or {"val": dict(name="ref_coco_m", split="val", weight=1.0)}
  return config


def _train_iter(data, config=None):
  config = config or _config(data["out"])
  return iter(pipeline.train_dataset(config, data["tokenize"],
                                     shard=pipeline.ProcessShard(0, 1)))


def test_batches_fit_the_model_and_give_a_finite_loss(data):
  config = _config(data["out"])
  batch = next(_train_iter(data, config))
  assert set(INPUT_KEYS + LOSS_KEYS) <= set(batch)
  s = config.model.convnext.image_size
  assert batch["image_high"].shape == (4, s, s, 3)
  assert batch["masks"].shape == (4, s, s) and batch["masks"].dtype == np.float32
  model = models.build_model(config, nnx.Rngs(0))
  inputs = {k: batch[k] for k in INPUT_KEYS + LOSS_KEYS}
  model.check_batch(inputs)
  total, parts = nnx.jit(  # compiled: faster than the op-by-op forward
      lambda model, inputs: compute_loss(model(inputs), inputs, config.model.loss))(model, inputs)
  assert np.isfinite(total) and all(np.isfinite(v) for v in parts.values())


def _eval(data, split="val", batch_size=5, shard=pipeline.ProcessShard(0, 1)):
  return list(pipeline.eval_dataset(_config(data["out"]), "ref_coco_m", split, data["tokenize"],
                                    batch_size=batch_size, shard=shard))


def test_eval_yields_every_expression_once_and_pads_the_last_batch(data):
  batches = _eval(data)
  valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
  ids = np.concatenate([b["expression_id"] for b in batches])[valid]
  gran = np.concatenate([b["granularity"] for b in batches])[valid]
  scenes = data["scenes"]["val"]
  expected = {i: r for sc in scenes for r in sc.refs for i in r.sent_ids}
  assert sorted(ids.tolist()) == sorted(expected)
  assert all(b["valid"].shape == (5,) for b in batches)
  assert valid.sum() == len(expected) and len(valid) - valid.sum() < 5
  names = {0: "object", 1: "part", 2: "multi", 3: "none"}
  for i, g in zip(ids, gran):
    n = len(expected[i].segment_ids)
    assert names[int(g)] in (("none",) if n == 0 else ("multi",) if n > 1 else ("object", "part"))


def _expected_union(scene, ref, size):
  """The referred segments' union, placed top-left in a `size` square (scale 1: no resize)."""
  out = np.zeros((size, size), np.float32)
  h, w = scene.pixels.shape[:2]
  for seg in ref.segment_ids:
    out[:h, :w] = np.maximum(out[:h, :w], scene.segment(seg).mask)
  return out


def test_masks_boxes_and_images_follow_the_letterbox(data):
  # Tiny views: 64 px high (48x64 images: scale 1), 32 px low (scale 1/2).
  by_sent = {i: (sc, r) for sc in data["scenes"]["val"] for r in sc.refs for i in r.sent_ids}
  raw = data["raw"]
  for batch in _eval(data):
    for row in np.flatnonzero(batch["valid"]):
      scene, ref = by_sent[int(batch["expression_id"][row])]
      np.testing.assert_array_equal(batch["masks"][row], _expected_union(scene, ref, 64))
      assert bool(batch["no_target"][row]) == (not ref.segment_ids)
      assert batch["scale"][row] == 1.0
      np.testing.assert_array_equal(batch["original_size"][row], [48, 64])
      n_obj = len(scene.object_proposals)
      np.testing.assert_allclose(batch["object_boxes"][row][:n_obj], scene.object_proposals,
                                 atol=1e-4)
      assert batch["object_valid"][row].tolist() == [True] * n_obj + [False] * (4 - n_obj)
      with Image.open(os.path.join(raw, "images", scene.file_name)) as im:
        pixels = np.asarray(im.convert("RGB"), np.float32) / 255.0
      expected = (pixels - [0.48145466, 0.4578275, 0.40821073]) / [0.26862954, 0.26130258,
                                                                   0.27577711]
      np.testing.assert_allclose(batch["image_high"][row][:48], expected, atol=1e-5)
      assert not batch["image_high"][row][48:].any()  # Padding is the mean: 0 once normalised.
      assert not batch["image_low"][row][24:].any()


def test_masks_are_resized_with_the_image(data):
  config = _config(data["out"])
  config.model.convnext.image_size = 128  # scale 2: nearest-neighbour doubles every pixel
  spec = preprocess.sample_spec(config.model, config.input)
  source = pipeline.open_source("ref_coco_m", "val", data["out"])
  example = source[0]
  prepared = preprocess.prepare_image(example, spec, data["tokenize"])
  for sample, indices in zip(preprocess.expand(prepared, spec),
                             example["expressions"]["target_indices"]):
    union = np.zeros((48, 64), bool)
    for j in indices:
      union |= example["targets"]["mask"][j][..., 0] != 0
    expected = np.zeros((128, 128), np.float32)
    expected[:96] = np.repeat(np.repeat(union, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(sample["masks"], expected)
  np.testing.assert_allclose(prepared["object_boxes"][:len(example["proposals"]["object_boxes"])],
                             2 * example["proposals"]["object_boxes"])


_DIGEST = r"""
import hashlib, sys
from unires_jax.data import pipeline, tokenizer
from tests.data.test_pipeline import _config
out, tok_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = _config(out)
config.input.seed = seed
it = iter(pipeline.train_dataset(config, tokenizer.hf_tokenize(tokenizer.load_tokenizer(tok_dir)),
                                 shard=pipeline.ProcessShard(0, 1)))
h = hashlib.sha256()
for _ in range(3):
  batch = next(it)
  for key in sorted(batch):
    h.update(key.encode()); h.update(batch[key].tobytes())
print(h.hexdigest())
"""


def _digest_in_process(data, seed):
  proc = subprocess.run([sys.executable, "-c", _DIGEST, data["out"], data["tokenizer_dir"],
                         str(seed)], capture_output=True, text=True, cwd=REPO_ROOT,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout.split()[-1]


def test_same_seed_same_batches_in_two_processes(data):
  first, second = _digest_in_process(data, 0), _digest_in_process(data, 0)
  assert first == second
  assert _digest_in_process(data, 1) != first


def _same(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_resumes_at_the_exact_next_batch_from_a_saved_state(data):
  it = _train_iter(data)
  for _ in range(5):  # Past the first epoch (31 expressions / 4 per batch: not a multiple).
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # What a checkpoint stores.
  expected = [next(it) for _ in range(3)]
  resumed = _train_iter(data)
  resumed.set_state(state)
  for batch in expected:
    assert _same(next(resumed), batch)


def test_datasets_mix_by_weight(data):
  config = _config(data["out"], a=dict(name="ref_coco_m", split="val", weight=3.0),
                   b=dict(name="ref_coco_m", split="testA", weight=1.0))
  it = _train_iter(data, config)
  labels = np.concatenate([next(it)["dataset"] for _ in range(40)])
  assert abs(np.mean(labels == 0) - 0.75) < 0.03


def test_processes_share_the_images_without_overlap(data):
  seen = []
  for index in range(2):
    batches = _eval(data, shard=pipeline.ProcessShard(index, 2))
    valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
    seen.append(set(np.concatenate([b["image_index"] for b in batches])[valid].tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(SPLITS["val"]))


def test_source_masks_are_tfds_own_decoding_and_the_source_pickles(data):
  import tensorflow_datasets as tfds

  ours = pipeline.open_source("ref_coco_m", "val", data["out"])
  builder = tfds.builder_from_directory(pipeline.dataset_dir("ref_coco_m", data["out"]))
  theirs = builder.as_data_source(split="val")
  for source in (ours, pickle.loads(pickle.dumps(ours))):  # Grain's worker processes pickle it.
    for i in range(len(theirs)):
      a, b = source[i]["targets"]["mask"], theirs[i]["targets"]["mask"]
      assert type(a) is type(b) and len(a) == len(b)
      for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_unknown_split_names_the_available_ones(data):
  with pytest.raises(ValueError, match=r"unknown split 'train'.*\['testA', 'testB', 'val'\]"):
    _eval(data, split="train")


def test_a_split_slice_reads_its_images_and_a_bad_one_is_named(data):
  """TFDS's slicing cuts between images: the two halves hold the split's images once each."""
  whole = pipeline.open_source("ref_coco_m", "testB", data["out"])
  head = pipeline.open_source("ref_coco_m", "testB[:1]", data["out"])
  tail = pipeline.open_source("ref_coco_m", "testB[1:]", data["out"])
  ids = lambda source: [source[i]["image_id"] for i in range(len(source))]
  assert len(head) == 1 and len(tail) >= 1 and ids(head) + ids(tail) == ids(whole)
  with pytest.raises(ValueError, match=r"unknown split 'train\[:2\]'.*'train\[:300\]'"):
    pipeline.open_source("ref_coco_m", "train[:2]", data["out"])
  with pytest.raises(ValueError, match=r"split 'testB\[:two\]' of dataset 'ref_coco_m'"):
    pipeline.open_source("ref_coco_m", "testB[:two]", data["out"])


def test_without_stored_proposals_training_gets_jittered_target_boxes(data):
  config = _config(data["out"])
  spec = preprocess.sample_spec(config.model, config.input)
  source = pipeline.open_source("ref_coco_m", "testB", data["out"])
  for index in range(len(source)):
    example = source[index]
    assert not len(example["proposals"]["object_boxes"])
    targets = example["targets"]
    for kind, granularity in (("object", 0), ("part", 1)):
      boxes = np.stack(targets["box"])[np.asarray(targets["granularity"]) == granularity]
      prepared = preprocess.prepare_image(example, spec, data["tokenize"],
                                          rng=np.random.default_rng(index))
      got = prepared[f"{kind}_boxes"][prepared[f"{kind}_valid"]]
      assert len(got) == min(len(boxes), 4)
      size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
      for box in got:  # Each proposal lies within the jitter of one target box.
        assert np.any(np.all(np.abs(box - boxes) <= 0.1 * size + 1e-4, axis=1))
    unjittered = preprocess.prepare_image(example, spec, data["tokenize"])
    assert not unjittered["object_valid"].any() and not unjittered["part_valid"].any()
  batches = _eval(data, split="testB")
  assert not any(b["object_valid"].any() for b in batches)


def test_reads_our_ref_coco_where_tfds_registers_its_own(tmp_path, data):
  # TFDS ships a `ref_coco` of another schema; the pipeline finds our folder on disk instead.
  rng = np.random.default_rng(7)
  scenes = [common.random_scene(rng, 900 + i, with_parts=False, first_segment_id=100 * (i + 1),
                                first_ref_id=10 * i, first_sent_id=100 * i) for i in range(5)]
  refcoco.write(str(tmp_path / "raw"), "refcoco", {"unc": {
      "train": scenes[:2], "val": scenes[2:3], "testA": scenes[3:4], "testB": scenes[4:]}})
  build.prepare("ref_coco", config="refcoco_unc", manual_dir=str(tmp_path / "raw"),
                data_dir=str(tmp_path / "tfds"))
  source = pipeline.open_source("ref_coco/refcoco_unc", "train", str(tmp_path / "tfds"))
  assert len(source) == 2
  assert len(pipeline.open_source("ref_coco/refcoco_unc:1.0.0", "train", str(tmp_path / "tfds")))
  assert len(pipeline.open_source("ref_coco", "train", str(tmp_path / "tfds"))) == 2  # Only config.
  (tmp_path / "tfds" / "ref_coco" / "refcocog_umd" / "1.0.0").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"configs \['refcoco_unc', 'refcocog_umd'\]: name one"):
    pipeline.open_source("ref_coco", "train", str(tmp_path / "tfds"))


def test_unbuilt_dataset_is_a_clear_error(tmp_path, data):
  with pytest.raises(FileNotFoundError, match="not built"):
    pipeline.open_source("ref_coco_m", "val", str(tmp_path))


def test_token_ids_outside_the_vocabulary_are_rejected(data):
  config = _config(data["out"])
  spec = preprocess.sample_spec(config.model, config.input)
  example = pipeline.open_source("ref_coco_m", "val", data["out"])[0]
  with pytest.raises(ValueError, match="outside the model's base vocabulary of 128"):
    preprocess.prepare_image(example, spec, lambda texts: [[5, 300]] * len(texts))


def test_batch_must_split_over_processes(data):
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.ProcessShard(0, 3).batch_size(4)


def test_digest_helper_is_deterministic_within_a_process(data):
  # Guards the two-process test: two iterators of one process agree too.
  a, b = _train_iter(data), _train_iter(data)
  for _ in range(2):
    assert _same(next(a), next(b))
