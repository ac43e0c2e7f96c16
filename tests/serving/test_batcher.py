"""serving.batcher: requests that arrive together share one model call, every answer is the
segmenter's own, and nothing compiles after the warm-up; a failing batch leaves the worker
serving. Also the page's request checks (serving.app.read_request), save_request, and
unires-serve's --step on a converted checkpoint."""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from jax import monitoring
from PIL import Image

from tests.repo import ROOT
from tests.serving.conftest import CALIBRATION_IMAGES
from unires_jax import checkpoint, inference
from unires_jax.data import pipeline
from unires_jax.serving import app, batcher as batcher_lib

pytestmark = pytest.mark.xdist_group("serving")  # one worker trains `demo_run` (.ci/run)

LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # each jit cache miss lowers


class _Gated:
  """The segmenter behind a gate: a call sets `entered`, then waits for `gate`; `calls` records
  each call's number of inputs."""

  def __init__(self, segmenter: inference.Segmenter):
    self.segmenter, self.batch_size = segmenter, segmenter.batch_size
    self.entered, self.gate, self.calls = threading.Event(), threading.Event(), []

  def segment(self, images, texts, boxes):
    self.entered.set()
    self.gate.wait()
    self.calls.append(len(images))
    return self.segmenter.segment(images, texts, boxes)


@pytest.fixture(scope="module")
def segmenter(demo_run):
  return inference.Segmenter.from_checkpoint(demo_run, batch_size=8)


def test_the_trained_runs_calibrated_threshold_is_the_segmenters_default(segmenter, demo_run):
  """The trainer calibrated the final checkpoint on the images it left out of training; that
  threshold, not the config's 0.5, is what the segmenter (and unires-segment, -serve, -eval)
  uses unless one is given."""
  where = checkpoint.locate(demo_run)
  record = where.calibration()
  assert where.step == 2 and record["step"] == 2 and record["split"] == "train[:8]"
  source = pipeline.open_source("ref_coco_m", f"train[:{CALIBRATION_IMAGES}]",
                                where.config().input.data_dir)
  expressions = [source[i]["expressions"]["no_target"] for i in range(len(source))]
  assert record["expressions"] == sum(len(e) for e in expressions)
  assert record["no_target_expressions"] == sum(int(np.sum(e)) for e in expressions)
  calibrated = record["calibrated"]
  default = record["at_config_threshold"]
  assert default["no_target_threshold"] == 0.5 and 0 < record["no_target_threshold"] < 1
  assert (calibrated["N-acc"] + calibrated["T-acc"]) >= (default["N-acc"] + default["T-acc"])
  assert segmenter.no_target_threshold == record["no_target_threshold"]


def _wait_until(condition, seconds: float = 60) -> None:
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


def test_requests_arriving_together_share_a_call_without_recompiling(segmenter, demo_run):
  folder = os.path.join(demo_run, "raw", "images")
  images = [inference.read_image(os.path.join(folder, n)) for n in sorted(os.listdir(folder))]
  model_cfg = segmenter.config.model
  requests = [  # (image, text, boxes): other sizes, texts and proposals than the warm-up's
      (images[0], "the truck cargo box", None),
      (images[1][:90], "the green object", {"object": [[5, 5, 60, 60]]}),
      (images[2][:, :70], "the green person legs", None),
      (images[0][10:], "all trucks", {"part": [[0, 0, 9, 9]]}),
      (images[1], "the red house roof", None),
      (images[2][:50, :60], "the purple tree", None)]
  requests = [(i, t, None if b is None else inference.parse_boxes(b, model_cfg, "boxes"))
              for i, t, b in requests]
  gated = _Gated(segmenter)
  answers = [None] * len(requests)
  compiles = []

  def count(event: str, *_, **__):
    if event == LOWERING:
      compiles.append(event)

  def ask(i: int) -> None:
    answers[i] = batcher.segment(*requests[i])

  with batcher_lib.Batcher(gated) as batcher:
    gated.gate.set()
    assert batcher.warm_up() > 0
    gated.gate.clear()
    gated.entered.clear()
    monitoring.register_event_duration_secs_listener(count)
    try:
      jax.jit(lambda x: x + 1)(np.float32(len(requests)))  # the listener sees a compilation
      assert compiles
      compiles.clear()
      threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
      threads[0].start()
      assert gated.entered.wait(60)  # the worker took the first request alone
      for t in threads[1:]:
        t.start()
      _wait_until(lambda: batcher._queue.qsize() == len(requests) - 1)  # pylint: disable=protected-access
      gated.gate.set()
      for t in threads:
        t.join(120)
    finally:
      monitoring.unregister_event_duration_listener(count)
  assert gated.calls == [1, 1, 5]  # the warm-up, the first request, the five queued behind it
  assert [a.batch_size for a in answers] == [1, 5, 5, 5, 5, 5]
  assert not compiles, f"{len(compiles)} compilations after the warm-up"

  expected = segmenter.segment(*map(list, zip(*requests)))
  for answer, result in zip(answers, expected):
    np.testing.assert_array_equal(answer.result.mask, result.mask)
    assert answer.result.no_target_prob == pytest.approx(result.no_target_prob, abs=1e-6)
    assert answer.result.proposals == result.proposals
  assert answers[1].result.boxes["object"].tolist() == [[5, 5, 60, 60]]
  assert answers[0].result.boxes["object"].tolist() == [[0, 0, 128, 128]]  # the whole image


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(segmenter):
  image = np.zeros((20, 30, 3), np.uint8)
  with batcher_lib.Batcher(segmenter) as batcher:
    with pytest.raises(ValueError, match="expected a .height, width, 3. uint8 image"):
      batcher.segment(np.zeros((20, 30), np.uint8), "the red truck")
    answer = batcher.segment(image, "the red truck")
  assert answer.result.mask.shape == (20, 30) and answer.batch_size == 1


def _write(path, data: bytes) -> str:
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


@pytest.mark.parametrize("name, data, text, boxes, message", [
    (None, None, "x", "", "upload an image first"),
    ("a.png", b"not an image", "x", "", r"a.png is not an image this server can read"),
    ("big.png", "png:300x200", "x", "", r"big.png has 300 x 200 pixels; this server takes at "
     r"most 50000 \(--max_pixels\)"),
    ("cut.jpg", "cut", "x", "", "cannot read image cut.jpg: image file is truncated"),
    ("a.png", "png:20x10", "  ", "", r"type an expression"),
    ("a.png", "png:20x10", "x" * 1001, "", "the expression has 1001 characters; at most 1000"),
    ("a.png", "png:20x10", "x", "[1, 2", r"boxes are not JSON .*; expected \{\"object\""),
    ("a.png", "png:20x10", "x", json.dumps({"object": [[0, 0, 1, 1]] * 7}),
     r"boxes: 7 object boxes, the model takes at most 6"),  # tests/train/shapes_config.py
])
def test_bad_requests_are_named(segmenter, tmp_path, name, data, text, boxes, message):
  upload = None
  if name:
    if isinstance(data, str) and data.startswith("png:"):
      width, height = map(int, data[4:].split("x"))
      upload = str(tmp_path / name)
      Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(upload)
    elif data == "cut":
      rng = np.random.default_rng(0)
      Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
      whole = (tmp_path / "x.jpg").read_bytes()
      upload = _write(tmp_path / name, whole[:len(whole) // 2])  # its header still reads
    else:
      upload = _write(tmp_path / name, data)
  with pytest.raises(ValueError, match=message):
    app.read_request(upload, text, boxes, segmenter.config.model, max_pixels=50_000)


def test_a_request_is_saved_whole(segmenter, tmp_path):
  upload = str(tmp_path / "in.png")
  Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(upload)
  request = app.read_request(upload, " the red truck ", '{"object": [[1, 2, 8, 9]]}',
                             segmenter.config.model, max_pixels=1000)
  assert request.text == "the red truck" and request.image.shape == (12, 16, 3)
  (result,) = segmenter.segment([request.image], [request.text], [request.boxes])
  answer = batcher_lib.Answer(result, 0.5, 2)
  out = app.save_request(str(tmp_path / "saved"), upload, request, answer)
  assert sorted(os.listdir(out)) == ["input.png", "mask.png", "mask_overlay.png", "request.json"]
  assert os.listdir(tmp_path / "saved") == [os.path.basename(out)]  # no partial folder left
  with open(os.path.join(out, "request.json"), encoding="utf-8") as f:
    record = json.load(f)
  assert record["text"] == "the red truck" and record["boxes"]["object"] == [[1, 2, 8, 9]]
  assert record["proposals"] == "given" and record["batch_size"] == 2
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, "mask.png"))) == 255,
                                result.mask)
  assert app.details(answer).startswith("proposals: 1 object box, 0 part boxes (given with the "
                                        "request) · model 0.500 s for a batch of 2 requests")


def test_serve_names_a_step_a_converted_checkpoint_does_not_have(converted_run):
  run = subprocess.run([sys.executable, "-m", "unires_jax.cli.serve",
                        f"--checkpoint={converted_run}", "--step=3"],
                       capture_output=True, text=True, cwd=ROOT, check=False)
  assert run.returncode == 2
  assert (f"error: --checkpoint={converted_run}: {converted_run} is a converted checkpoint (no training "
          "steps); drop the step") in run.stderr, run.stderr[-2000:]
