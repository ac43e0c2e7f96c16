"""ShapesParts: determinism, exact masks, granularity shares, unambiguous expressions, and the
demo path (write the raw layout, `tfds build` it with the RefCOCOm builder, read it back)."""

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests.tfds_builders import tfds_cli
from unires_jax.data import shapes_parts as sp

NUM_SCENES = 200
PLURALS = {kind.plural: name for name, kind in sp.KINDS.items()}


@pytest.fixture(scope="module")
def scenes():
  return sp.generate(NUM_SCENES, seed=3)


def _files(root: str) -> dict[str, bytes]:
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_same_seed_same_files_other_seed_differs(tmp_path):
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    sp.write(str(tmp_path / name), num_train=12, num_val=4, seed=seed, image_size=64)
  a, b, c = (_files(str(tmp_path / n)) for n in "abc")
  assert a == b
  assert {"annotations/train.json", "annotations/val.json", "proposals/train.json",
          "proposals/val.json"} <= set(a)
  assert a["annotations/train.json"] != c["annotations/train.json"]
  assert a["images/shapes_parts_00000001.jpg"] != c["images/shapes_parts_00000001.jpg"]


def test_a_split_does_not_depend_on_the_other_split_size(tmp_path):
  small = sp.write(str(tmp_path / "s"), num_train=2, num_val=3, seed=0)["val"]
  large = sp.write(str(tmp_path / "l"), num_train=9, num_val=3, seed=0)["val"]
  for x, y in zip(small, large):
    assert x.refs == y.refs and np.array_equal(x.pixels, y.pixels)


def test_ids_unique_across_splits(tmp_path):
  splits = sp.write(str(tmp_path), num_train=30, num_val=10, seed=0)
  all_scenes = [s for scenes in splits.values() for s in scenes]
  for ids in ([s.image_id for s in all_scenes], [s.file_name for s in all_scenes],
              [g.id for s in all_scenes for g in s.segments],
              [r.ref_id for s in all_scenes for r in s.refs],
              [i for s in all_scenes for r in s.refs for i in r.sent_ids]):
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("kind", sorted(sp.KINDS))
def test_every_part_visible_at_every_size(kind):
  aspect = sp.KINDS[kind].aspect
  for long_side in range(sp.MIN_OBJECT_SIZE, 80):
    w = long_side if aspect >= 1 else round(long_side * aspect)
    h = round(long_side / aspect) if aspect >= 1 else long_side
    labels = sp.draw_labels(kind, w, h)
    counts = [(labels == k + 1).sum() for k in range(len(sp.KINDS[kind].parts))]
    assert min(counts) >= 3, (long_side, counts)


def test_masks_exact_and_boxes_inside(scenes):
  for scene in scenes:
    size = scene.pixels.shape[0]
    assert scene.pixels.shape == (128, 128, 3) and scene.pixels.dtype == np.uint8
    objects = [s for s in scene.segments if s.part is None]
    assert 1 <= len(objects) <= 4
    assert np.sum([o.mask for o in objects], 0).max() == 1  # objects disjoint
    for obj in objects:
      parts = [s for s in scene.segments if s.parent == obj.id]
      assert [p.part for p in parts] == list(sp.KINDS[obj.category].parts)
      assert np.sum([p.mask for p in parts], 0).max() == 1  # parts disjoint
      assert np.array_equal(np.any([p.mask for p in parts], 0), obj.mask)
    assert all(s.mask.any() for s in scene.segments)
    for boxes in (scene.object_proposals, scene.part_proposals):
      assert boxes.dtype == np.float32 and boxes.shape[1:] == (4,)
      assert np.all(boxes >= 0) and np.all(boxes <= size)
      assert np.all(boxes[:, 2:] > boxes[:, :2])
    n_parts = len(scene.segments) - len(objects)
    assert len(objects) <= len(scene.object_proposals) and n_parts <= len(scene.part_proposals)
    assert (len(scene.object_proposals) + len(scene.part_proposals)
            <= len(scene.segments) + 2)


def _iou(a, b) -> float:
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  return w * h / (area(a) + area(b) - w * h)


def test_every_segment_has_a_close_proposal(scenes):
  for scene in scenes:
    for seg in scene.segments:
      x, y, w, h = seg.box_xywh
      boxes = scene.part_proposals if seg.part else scene.object_proposals
      assert max(_iou((x, y, x + w, y + h), b) for b in boxes) > 0.45


def test_granularity_shares_and_targets(scenes):
  counts = collections.Counter()
  for scene in scenes:
    assert scene.refs
    for ref in scene.refs:
      g = sp.ref_granularity(scene, ref)
      counts[g] += len(ref.sentences)
      assert 1 <= len(ref.sentences) <= 2 and len(ref.sent_ids) == len(ref.sentences)
      assert len(set(ref.segment_ids)) == len(ref.segment_ids)
      assert (len(ref.segment_ids) >= 2) == (g == "multi")
      assert (not ref.segment_ids) == (g == "none")
      assert all(scene.segment(i).mask.any() for i in ref.segment_ids)
  total = sum(counts.values())
  for g, share in sp.DEFAULT_SHARES.items():
    assert abs(counts[g] / total - share) < 0.06, (g, counts[g] / total)


def test_shares_parameter():
  only = sp.generate(20, seed=0, shares={"none": 1.0})
  assert {sp.ref_granularity(s, r) for s in only for r in s.refs} == {"none"}
  two = sp.generate(40, seed=0, shares={"part": 1, "multi": 1})
  assert {sp.ref_granularity(s, r) for s in two for r in s.refs} == {"part", "multi"}
  with pytest.raises(ValueError, match="unknown granularities"):
    sp.generate(1, seed=0, shares={"objects": 1.0})


@dataclasses.dataclass
class _Seen:
  """An object as a reader sees it: kind, colour (from the pixels), box, segment ids."""

  kind: str
  colour: str
  box: tuple
  ids: set


def _seen_objects(scene) -> list[_Seen]:
  palette = np.array(list(sp.COLOURS.values()), np.float32)
  out = []
  for obj in (s for s in scene.segments if s.part is None):
    first_part = next(s for s in scene.segments if s.parent == obj.id)  # shade 1.0: the colour
    mean = scene.pixels[first_part.mask].astype(np.float32).mean(0)
    colour = list(sp.COLOURS)[int(np.argmin(np.abs(palette - mean).sum(1)))]
    x, y, w, h = obj.box_xywh
    out.append(_Seen(obj.category, colour, (x, y, x + w, y + h),
                     {obj.id} | {s.id for s in scene.segments if s.parent == obj.id}))
  return out


# Whether box a (x1, y1, x2, y2) lies wholly to that side of box b.
_BEYOND = {"left": lambda a, b: a[2] <= b[0], "right": lambda a, b: b[2] <= a[0],
           "top": lambda a, b: a[3] <= b[1], "bottom": lambda a, b: b[3] <= a[1]}


def _matches(sentence: str, objects: list[_Seen]) -> list[_Seen]:
  """The objects a sentence's colour, kind and side words pick out (an independent reader)."""
  words = sentence.split()
  colours = {w for w in words if w in sp.COLOURS}
  kinds = {w for w in words if w in sp.KINDS} | {PLURALS[w] for w in words if w in PLURALS}
  found = [o for o in objects if (not colours or o.colour in colours)
           and (not kinds or o.kind in kinds)]
  for side, phrase in sp.SIDES.items():
    if phrase in sentence:
      found = [o for o in found if all(_BEYOND[side](o.box, p.box) for p in found if p is not o)]
  return found


def test_expressions_unambiguous(scenes):
  for scene in scenes:
    meaning = {}
    for ref in scene.refs:
      for s in ref.sentences:
        assert s == " ".join(s.split()) and s.islower()
        assert meaning.setdefault(s, sorted(ref.segment_ids)) == sorted(ref.segment_ids), s


def test_single_target_sentences_pick_out_their_target(scenes):
  checked = collections.Counter()
  for scene in scenes:
    objects = _seen_objects(scene)
    for ref in scene.refs:
      g = sp.ref_granularity(scene, ref)
      for s in ref.sentences:
        found = _matches(s, objects)
        if g in ("object", "part"):
          assert len(found) == 1 and ref.segment_ids[0] in found[0].ids, (s, found)
          if g == "part":
            part = scene.segment(ref.segment_ids[0]).part
            assert re.search(rf"\b{part}\b", s), (s, part)
        elif g == "none":
          assert not found, (s, found)
        checked[g] += 1
  assert checked["object"] and checked["part"] and checked["none"]


def test_sentences_varied(scenes):
  texts = {s for scene in scenes for r in scene.refs for s in r.sentences}
  assert len(texts) > 300
  assert any(r.sentences[0].removeprefix("the ") != r.sentences[1].removeprefix("the ")
             for scene in scenes for r in scene.refs if len(r.sentences) == 2)


def test_command_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "unires_jax.data.shapes_parts", f"--out={tmp_path}",
       "--num_train=3", "--num_val=2", "--seed=5", "--image_size=64"],
      capture_output=True, text=True, check=True)
  assert "train: 3 images" in proc.stdout and "val: 2 images" in proc.stdout
  assert sorted(os.listdir(tmp_path / "annotations")) == ["train.json", "val.json"]


def test_builds_with_the_ref_coco_m_builder(tmp_path):
  raw, data = tmp_path / "raw", tmp_path / "data"
  data.mkdir()
  splits = sp.write(str(raw), num_train=10, num_val=4, seed=7, image_size=96)
  tfds_cli.build("ref_coco_m", str(raw), str(data))
  for split, scenes in splits.items():
    examples = {e["file_name"]: e for e in tfds_cli.read_back("ref_coco_m", split, str(data),
                                                               str(tmp_path))}
    assert sorted(examples) == sorted(s.file_name for s in scenes)
    assert sum(len(e["expressions"]) for e in examples.values()) == sum(
        len(r.sentences) for s in scenes for r in s.refs)
    for scene in scenes:
      ex = examples[scene.file_name]
      assert ex["image"].shape == scene.pixels.shape
      # The builder keeps the JPEG bytes: TFDS decodes what PIL decodes (up to IDCT rounding).
      written = np.asarray(Image.open(raw / "images" / scene.file_name))
      assert np.abs(ex["image"].astype(int) - written).max() <= 2
      masks = {t["id"]: m for t, m in zip(ex["targets"], ex["masks"])}
      for t in ex["targets"]:
        seg = scene.segment(t["id"])
        assert np.array_equal(masks[t["id"]] != 0, seg.mask)
        assert t["granularity"] == ("part" if seg.part else "object")
      by_id = {e["id"]: e for e in ex["expressions"]}
      assert len(by_id) == sum(len(r.sentences) for r in scene.refs)
      for ref in scene.refs:
        for text, sent_id in zip(ref.sentences, ref.sent_ids):
          e = by_id[sent_id]
          assert e["text"] == text and e["ref_id"] == ref.ref_id
          assert e["granularity"] == sp.ref_granularity(scene, ref)
          assert e["no_target"] == (not ref.segment_ids)
          assert sorted(ex["targets"][j]["id"] for j in e["target_indices"]) == sorted(
              ref.segment_ids)
      np.testing.assert_allclose(np.sort(ex["object_boxes"], 0), np.sort(scene.object_proposals, 0),
                                 atol=1e-3)
      np.testing.assert_allclose(np.sort(ex["part_boxes"], 0), np.sort(scene.part_proposals, 0),
                                 atol=1e-3)


def test_concepts_left_out_are_never_named_and_a_kind_never_drawn(scenes):
  tree_words = re.compile(r"\b(" + "|".join(sp.concept_words("tree")) + r")\b")
  without = sp.generate(60, seed=3, without=["tree", "door"])
  assert {g.category for s in without for g in s.segments} == {"truck", "person", "house"}
  assert "door" in {g.part for s in without for g in s.segments}  # drawn, never named
  sentences = [t for s in without for r in s.refs for t in r.sentences]
  assert not [t for t in sentences if tree_words.search(t) or re.search(r"\bdoors?\b", t)]
  # The rest is still named, also in no-target sentences and as parts of houses.
  assert any(not r.segment_ids and "house" in t for s in without for r in s.refs
             for t in r.sentences)
  assert any(re.search(r"\b(roofs?|walls)\b", t) for t in sentences)
  # Leaving nothing out gives the scenes of every earlier version.
  assert all(a.refs == b.refs and np.array_equal(a.pixels, b.pixels)
             for a, b in zip(sp.generate(20, seed=3, without=()), scenes[:20]))
  with pytest.raises(ValueError, match=r"without: \['boat'\] are neither kinds"):
    sp.generate(1, seed=0, without=["truck", "boat"])
  with pytest.raises(ValueError, match="leaves no kind to draw"):
    sp.left_out(list(sp.KINDS))
  with pytest.raises(ValueError, match=r"about: \['boat'\] are neither kinds"):
    sp.write("unwritten", num_train=1, num_val=0, seed=0, about_concept="boat")


@pytest.mark.parametrize("concept,words,granularities", [
    ("door", r"doors?", {"part", "multi"}),
    ("tree", r"trees?|crowns?|trunks?", {"object", "part", "multi", "none"})])
def test_about_keeps_the_sentences_that_name_the_concept(scenes, concept, words, granularities):
  words = re.compile(rf"\b({words})\b")
  kept = sp.about(scenes, concept)
  original = {s.image_id: s for s in scenes}
  expected = {(s.image_id, r.ref_id): [i for i, t in zip(r.sent_ids, r.sentences)
                                       if words.search(t)]
              for s in scenes for r in s.refs}
  expected = {k: v for k, v in expected.items() if v}
  assert {(s.image_id, r.ref_id): r.sent_ids for s in kept for r in s.refs} == expected
  assert 0 < len(kept) < len(scenes)
  for scene in kept:  # the image, its segments and proposals as they were; only refs cut
    before = original[scene.image_id]
    assert scene.segments is before.segments and scene.pixels is before.pixels
    for ref in scene.refs:
      old = next(r for r in before.refs if r.ref_id == ref.ref_id)
      assert ref.segment_ids == old.segment_ids
      assert ref.sentences == [t for t in old.sentences if words.search(t)]
  found = collections.Counter(sp.ref_granularity(s, r) for s in kept for r in s.refs)
  assert set(found) == granularities, found


def test_command_line_writes_one_concept_in_the_ref_custom_layout(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "unires_jax.data.shapes_parts", f"--out={tmp_path / 'raw'}",
       "--num_train=24", "--num_val=0", "--seed=5", "--image_size=64", "--layout=ref_custom",
       "--about=door"], capture_output=True, text=True, check=True)
  assert "(ref_custom layout)" in proc.stdout
  assert sorted(os.listdir(tmp_path / "raw")) == ["images", "instances.json", "masks",
                                                   "proposals", "refs"]
  with open(tmp_path / "raw" / "refs" / "train.jsonl", encoding="utf-8") as f:
    sentences = [t for line in f for t in json.loads(line)["sentences"]]
  assert sentences and all(re.search(r"\bdoors?\b", t) for t in sentences)
  bad = subprocess.run(
      [sys.executable, "-m", "unires_jax.data.shapes_parts", f"--out={tmp_path / 'bad'}",
       "--without=truck,boat"], capture_output=True, text=True, check=False)
  assert bad.returncode != 0 and "are neither kinds" in bad.stderr
  assert not (tmp_path / "bad").exists()
