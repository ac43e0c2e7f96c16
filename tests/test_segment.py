"""unires_jax.inference and unires-segment on a tiny random checkpoint: masks at the image's size
that match the model's own forward pass, the verdict, the batch file, clear input errors."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app, flags
from flax import nnx
from PIL import Image

from unires_jax import checkpoint, inference, models
from unires_jax.config_lib import load_config
from unires_jax.data import preprocess, tokenizer

TEXTS = ("the red cup", "a blue ball", "the left wheel")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(converted checkpoint directory, its model, folder with a.png [50, 37] and b.png [40, 60]).

  Random weights, but the no-target head's prior is lowered by 10 so that the model answers
  "target" and its masks show (about 15% of each image).
  """
  root = tmp_path_factory.mktemp("segment")
  config = load_config("tiny")
  tok = str(root / "tokenizer")
  tokenizer.train_tokenizer([*tokenizer.PROMPT_WORDS, *TEXTS], config.model.llm.vocab_size, tok)
  model = models.build_model(config, nnx.Rngs(0))
  bias = model.no_target_head.fc2.bias
  bias.set_value(bias.get_value() - 10.0)
  checkpoint.save_converted(nnx.state(model, nnx.Param), config, str(root / "ckpt"),
                            tokenizer_dir=tok)
  rng = np.random.default_rng(0)
  for name, shape in (("a.png", (50, 37, 3)), ("b.png", (40, 60, 3))):
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
  return str(root / "ckpt"), model, root


@pytest.fixture(scope="module")
def segmenter(tiny):
  # One row per call: rounded up to the 8 devices of tests/conftest.py, as the CLI's are.
  return inference.Segmenter.from_checkpoint(tiny[0], batch_size=1)


def _image(root, name: str) -> np.ndarray:
  return np.asarray(Image.open(root / name))


def test_reading_a_checkpoint_warns_of_nothing(tiny, caplog):
  """Orbax's Checkpointer took the parameters' folder for a step folder and warned of a missing
  `_CHECKPOINT_METADATA` on every read; `unires_jax.checkpoint` reads with the handler."""
  where = checkpoint.locate(tiny[0])
  with caplog.at_level(logging.INFO):
    name = sorted(checkpoint.param_shapes(where))[0]
    assert checkpoint.read_params(where, [name])[name].ndim >= 1
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_mask_overlay_and_verdict(segmenter, tiny, tmp_path, monkeypatch):
  image = _image(tiny[2], "a.png")
  (result,) = segmenter.segment([image], ["the red cup"])
  assert result.mask.shape == (50, 37) and result.mask.dtype == bool
  assert 0.02 < result.area_fraction < 0.98  # a real mask, not all or nothing
  assert result.proposals == "whole_image"
  assert not result.no_target and result.no_target_prob < 0.5

  inference.save(result, image, str(tmp_path / "m.png"))
  mask = np.asarray(Image.open(tmp_path / "m.png"))
  assert mask.shape == (50, 37) and set(np.unique(mask)) == {0, 255}
  np.testing.assert_array_equal(mask == 255, result.mask)
  with Image.open(tmp_path / "m_overlay.png") as overlay:
    assert overlay.size == (37, 50) and overlay.mode == "RGB"

  # Above the threshold: no target, an empty mask, the same probability.
  monkeypatch.setattr(segmenter, "no_target_threshold", result.no_target_prob / 2)
  (none,) = segmenter.segment([image], ["the red cup"])
  assert none.no_target and not none.mask.any()
  assert none.no_target_prob == pytest.approx(result.no_target_prob, rel=1e-6)


def test_mask_is_the_models_forward_pass(segmenter, tiny):
  """The model called here on the pipeline's sample, its logits resized back with JAX (PIL in
  the segmenter): wrong cropping, scaling or orientation would move the mask."""
  _, model, root = tiny
  image = _image(root, "b.png")  # [40, 60]: the letterbox pads rows
  boxes = {"object": [[6, 3, 30, 36]], "part": [[12, 9, 21, 24]]}
  (result,) = segmenter.segment([image], ["a blue ball"], [boxes])

  config = segmenter.config
  spec = preprocess.sample_spec(config.model, config.input)
  example = {"image": image, "targets": {"mask": []},
             "proposals": {"object_boxes": np.float32(boxes["object"]),
                           "part_boxes": np.float32(boxes["part"])},
             "expressions": {"text": ["a blue ball"], "id": [0], "target_indices": [[]],
                             "granularity": [0], "no_target": [False]}}
  tokenize = tokenizer.hf_tokenize(tokenizer.load_tokenizer(config.input.tokenizer))
  sample = preprocess.expand(preprocess.prepare_image(example, spec, tokenize), spec)[0]
  scale = 64 / 60  # the high-resolution view is 64 pixels; the longer side is 60
  np.testing.assert_allclose(sample["object_boxes"][0], np.float32(boxes["object"][0]) * scale)
  out = nnx.jit(lambda m, b: m(b))(model, {k: v[None] for k, v in sample.items()})
  logits = jax.image.resize(out.mask_logits[0].astype(jnp.float32), (64, 64), "bilinear")
  expected = np.asarray(jax.image.resize(logits[:43, :64], (40, 60), "bilinear"))  # 40 * scale

  assert not result.no_target
  assert 0.02 < result.mask.mean() < 0.98
  # PIL's and JAX's bilinear resamplers (both antialiased, half-pixel centres) agree to ~1e-5
  # of the largest value here; only pixels with a logit within 1e-3 of it may differ.
  decided = np.abs(expected) > 1e-3 * np.abs(expected).max()
  np.testing.assert_array_equal(result.mask[decided], expected[decided] > 0)
  assert decided.mean() > 0.99


def _segment_cli(*args: str) -> int:
  """`unires-segment ARGS` in this process. Imported here, not at collection: the CLI modules
  define their flags in absl's one global registry."""
  from unires_jax.cli import segment as segment_cli

  flags.FLAGS.unparse_flags()
  flags.FLAGS(["unires-segment", *args])
  return segment_cli.main(["unires-segment"])


def test_cli_single_and_batch(segmenter, tiny, tmp_path, capsys):
  ckpt, _, root = tiny
  out = tmp_path / "single" / "mask.png"
  assert _segment_cli(f"--checkpoint={ckpt}", f"--image={root / 'a.png'}",
                      "--text=the red cup", f"--out={out}") == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith(f'{root / "a.png"} "the red cup": target (no-target p=0.00), mask ')
  assert line.endswith(f"-> {out}; no boxes given, the whole image is the proposal")
  (expected,) = segmenter.segment([_image(root, "a.png")], ["the red cup"])
  np.testing.assert_array_equal(np.asarray(Image.open(out)) == 255, expected.mask)
  assert os.path.isfile(tmp_path / "single" / "mask_overlay.png")

  boxes = {"object": [[6, 3, 30, 36]], "part": [[12, 9, 21, 24]]}
  lines = [{"image": "a.png", "text": TEXTS[0]}, {"image": "b.png", "text": TEXTS[1]},
           {"image": "b.png", "text": TEXTS[1], "boxes": boxes}]
  batch = root / "lines.jsonl"
  batch.write_text("\n\n".join(json.dumps(r) for r in lines) + "\n")  # blank lines are skipped
  out_dir = tmp_path / "batch"
  out_dir.mkdir()
  (out_dir / "000000.png").write_bytes(b"an older file")
  assert _segment_cli(f"--checkpoint={ckpt}", f"--batch={batch}", f"--out_dir={out_dir}") == 0
  printed = capsys.readouterr().out.splitlines()
  assert [p[:6] for p in printed] == ["[1/3] ", "[2/3] ", "[3/3] "]

  with open(out_dir / "results.jsonl", encoding="utf-8") as f:
    records = [json.loads(r) for r in f]
  assert sorted(os.listdir(out_dir)) == sorted(
      ["results.jsonl"] + [f"00000{i}{s}.png" for i in range(3) for s in ("", "_overlay")])
  assert [(r["image"], r["text"], r["proposals"]) for r in records] == [
      ("a.png", TEXTS[0], "whole_image"), ("b.png", TEXTS[1], "whole_image"),
      ("b.png", TEXTS[1], "given")]
  expected = segmenter.segment([_image(root, n) for n in ("a.png", "b.png", "b.png")],
                               [r["text"] for r in lines], [None, None, boxes])
  for record, result in zip(records, expected):
    mask = np.asarray(Image.open(out_dir / record["mask"])) == 255
    np.testing.assert_array_equal(mask, result.mask)
    assert record["mask_area_fraction"] == pytest.approx(mask.mean())
    assert record["no_target"] is False
    assert record["no_target_prob"] == pytest.approx(result.no_target_prob, rel=1e-5)
  assert records[1]["mask_area_fraction"] != records[2]["mask_area_fraction"]  # boxes matter


TOO_MANY = json.dumps({"object": [[0, 0, 9, 9]] * 5})
TOO_MANY_PARTS = json.dumps({"image": "a.png", "text": "x", "boxes": {"part": [[0, 0, 1, 1]] * 5}})


@pytest.mark.parametrize("args, lines, message", [
    (["--image={root}/missing.png", "--text=x", "--out={tmp}/m.png"], None,
     "--image: image .*missing.png not found"),
    (["--image={root}/a.png", "--text=x", "--out={tmp}/m.png", f"--boxes={TOO_MANY}"], None,
     r"--boxes: 5 object boxes, the model takes at most 4 \(config.model.max_objects\)"),
    (["--image={root}/a.png", "--text=x", "--out={tmp}/m.png", "--boxes=[1, 2"], None,
     "--boxes is not JSON"),
    (["--batch={tmp}/lines.jsonl", "--out_dir={tmp}/o"], ['{"image": "a.png", "text": "x"}',
                                                          "{not json"],
     r"lines.jsonl:2: not JSON"),
    (["--batch={tmp}/lines.jsonl", "--out_dir={tmp}/o"], ['{"image": "a.png"}'],
     r'lines.jsonl:1: expected \{"image": PATH, "text": TEXT'),
    (["--batch={tmp}/lines.jsonl", "--out_dir={tmp}/o"], ["", "", TOO_MANY_PARTS],
     r"lines.jsonl:3: 5 part boxes, the model takes at most 4 \(config.model.max_parts\)"),
    (["--image={root}/a.png", "--out={tmp}/m.png"], None, "--image needs --text"),
    (["--image={tmp}/broken.jpg", "--text=x", "--out={tmp}/m.png"], None,
     r"cannot read image .*broken.jpg: image file is truncated.*; stopped after 0 of 1 inputs"),
])
def test_cli_rejects_bad_inputs(tiny, tmp_path, args, lines, message):
  ckpt, _, root = tiny
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(noise).save(tmp_path / "broken.jpg")
  data = (tmp_path / "broken.jpg").read_bytes()
  (tmp_path / "broken.jpg").write_bytes(data[:len(data) // 2])  # its header still reads
  if lines is not None:
    (tmp_path / "a.png").symlink_to(root / "a.png")
    (tmp_path / "lines.jsonl").write_text("\n".join(lines) + "\n")
  args = [a.replace("{root}", str(root)).replace("{tmp}", str(tmp_path)) for a in args]
  with pytest.raises(app.UsageError, match=message):
    _segment_cli(f"--checkpoint={ckpt}", *args)
  assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "m.png")


def test_a_sentence_longer_than_the_prompt_is_cut_with_a_warning(segmenter, tiny, caplog):
  room = segmenter.config.input.max_prompt_tokens
  long_text = " ".join(["the red cup"] * room)
  image = _image(tiny[2], "a.png")
  with caplog.at_level("WARNING", logger="unires_jax.inference"):
    (cut,) = segmenter.segment([image], [long_text])
  assert f"longer than the prompt's room of {room} tokens" in caplog.text
  assert "input 0" in caplog.text and cut.mask.shape == (50, 37)
  caplog.clear()
  with caplog.at_level("WARNING", logger="unires_jax.inference"):
    segmenter.segment([image], ["the red cup"])
  assert not caplog.text


def test_segment_rejects_too_many_boxes(segmenter):
  with pytest.raises(ValueError, match="input 1: 5 object boxes"):
    segmenter.segment([np.zeros((8, 8, 3), np.uint8)] * 2, ["x", "x"],
                      [None, {"object": [[0, 0, 1, 1]] * 5}])


def test_a_detector_proposes_for_inputs_without_boxes(segmenter, tiny, tmp_path, capsys):
  from tests.owlv2_files import write_tiny_detector  # pylint: disable=g-import-not-at-top
  from unires_jax import propose  # pylint: disable=g-import-not-at-top

  cfg = load_config("tiny").proposals
  cfg.update(query_template="{part}", part_vocabulary=("cup", "wheel"), batch_size=8,
             object_k=3, part_k=2)
  detector = propose.Detector.from_pretrained(write_tiny_detector(str(tmp_path / "owlv2")),
                                              cfg)
  with_detector = inference.Segmenter.from_checkpoint(tiny[0], batch_size=1, detector=detector)
  images = [_image(tiny[2], "a.png"), _image(tiny[2], "b.png")]
  found = detector(images)
  assert len(found[0].object_boxes) == 3  # objectness above 0: the top 3 after NMS
  results = with_detector.segment(images, TEXTS[:2], [None, {"object": [[0, 0, 5, 5]]}])
  assert [r.proposals for r in results] == ["detector", "given"]
  # The detector's boxes are what the model saw: the same as giving them.
  (given,) = segmenter.segment(images[:1], TEXTS[:1], [
      {"object": found[0].object_boxes, "part": found[0].part_boxes}])
  np.testing.assert_array_equal(results[0].mask, given.mask)
  assert results[0].no_target_prob == pytest.approx(given.no_target_prob, abs=1e-6)

  # unires-segment --detector: the checkpoint config's `proposals` settings (the tiny config's).
  ckpt, _, root = tiny
  out = tmp_path / "cli" / "mask.png"
  assert _segment_cli(f"--checkpoint={ckpt}", f"--image={root / 'a.png'}", f"--text={TEXTS[0]}",
                      f"--out={out}", f"--detector={tmp_path / 'owlv2'}") == 0
  assert capsys.readouterr().out.strip().endswith(f"-> {out}; proposals from the detector")
  cli_detector = propose.Detector.from_pretrained(str(tmp_path / "owlv2"),
                                                  load_config("tiny").proposals)
  (found,) = cli_detector(images[:1])
  (expected,) = segmenter.segment(images[:1], TEXTS[:1], [
      {"object": found.object_boxes[:4], "part": found.part_boxes[:4]}])
  np.testing.assert_array_equal(np.asarray(Image.open(out)) == 255, expected.mask)
