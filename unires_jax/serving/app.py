"""The page of `unires-serve`: upload an image, type an expression, optionally give boxes; see
the overlay, the mask, the proposals, the verdict and what the model took.

`page(...)` builds the Gradio Blocks over a `batcher.Batcher`; `unires_jax.cli.serve` launches
it. Every request is checked here before it is queued (`read_request`): an upload that is not an
image, too many pixels, an empty or overlong expression, or boxes that are not
`inference.parse_boxes`'s form give a message in the page (`Error: ...` in the verdict), never a
stack trace, and the server goes on serving. Uploads reach the handler as files in Gradio's
upload folder (`GRADIO_TEMP_DIR`, which the command line points at a private temporary folder);
they are kept elsewhere only with `save_dir` (`save_request`).
"""

import dataclasses
import json
import os
import shutil
import time
import uuid
from typing import Any

import gradio as gr
import ml_collections
import numpy as np
from PIL import Image

from unires_jax import inference, utils
from unires_jax.evaluation import overlays
from unires_jax.serving import batcher as batcher_lib

MAX_TEXT_CHARS = 1000
BOXES_HINT = '{"object": [[x1, y1, x2, y2], ...], "part": [...]}'
_BUTTONS = ["download", "fullscreen"]  # not Gradio's "share" (a Hugging Face upload)
_SOURCES = {"given": "given with the request", "detector": "found by the detector",
            "whole_image": "none given: the whole image is the one object proposal"}


@dataclasses.dataclass(frozen=True)
class Request:
  """A checked request.

  image:  `[height, width, 3]` uint8 pixels of the upload (`inference.read_image`)
  name:   the upload's file name
  text:   the referring expression, stripped
  boxes:  the proposals given (`inference.Boxes`), or None
  """

  image: np.ndarray
  name: str
  text: str
  boxes: inference.Boxes | None


def read_request(upload: str | None, text: str | None, boxes: str | None,
                 model_cfg: ml_collections.ConfigDict, max_pixels: int) -> Request:
  """The request of the page's fields; a ValueError with a message for the page otherwise.

  Args:
    upload: path of the uploaded file, or None when nothing was uploaded.
    text: the expression.
    boxes: JSON in `BOXES_HINT`'s form, or blank for none.
    model_cfg: `config.model` (how many boxes of each kind it takes).
    max_pixels: the most pixels (width x height) an image may have.
  """
  if not upload:
    raise ValueError("upload an image first")
  name = os.path.basename(upload)
  try:
    with Image.open(upload) as header:
      width, height = header.size
  except (OSError, Image.DecompressionBombError):
    raise ValueError(f"{name} is not an image this server can read (PNG, JPEG, ...)") from None
  if width * height > max_pixels:
    raise ValueError(f"{name} has {width} x {height} pixels; this server takes at most "
                     f"{max_pixels} (--max_pixels)")
  text = (text or "").strip()
  if not text:
    raise ValueError("type an expression (what to segment)")
  if len(text) > MAX_TEXT_CHARS:
    raise ValueError(f"the expression has {len(text)} characters; at most {MAX_TEXT_CHARS}")
  parsed = None
  if boxes and boxes.strip():
    try:
      parsed = inference.parse_boxes(json.loads(boxes), model_cfg, "boxes")
    except json.JSONDecodeError as e:
      raise ValueError(f"boxes are not JSON ({e}); expected {BOXES_HINT}") from None
  try:
    image = inference.read_image(upload)
  except ValueError as e:  # the header read, the pixels do not (a truncated file)
    raise ValueError(str(e).replace(upload, name)) from None
  return Request(image, name, text, parsed)


def details(answer: batcher_lib.Answer) -> str:
  """`proposals: 1 object box, 0 part boxes (given with the request) · model 0.12 s for a batch
  of 3 requests`"""
  boxes = answer.result.boxes
  counts = ", ".join(f"{len(boxes[k])} {k} box{'es' if len(boxes[k]) != 1 else ''}"
                     for k in inference.BOX_KINDS)
  requests = f"{answer.batch_size} request{'s' if answer.batch_size != 1 else ''}"
  return (f"proposals: {counts} ({_SOURCES[answer.result.proposals]}) · model "
          f"{answer.seconds:.3f} s for a batch of {requests}")


def save_request(save_dir: str, upload: str, request: Request,
                 answer: batcher_lib.Answer) -> str:
  """Writes a request and its answer to a new folder `save_dir/<time>-<id>/`, complete or not
  at all: the upload as it came (`input<ext>`), `request.json` (text, boxes, verdict, timing),
  `mask.png` and `mask_overlay.png` (`inference.save`). Returns the folder."""
  out = os.path.join(save_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
  result = answer.result
  record = {"image": request.name, "text": request.text,
            "boxes": {k: v.tolist() for k, v in result.boxes.items()},
            "proposals": result.proposals, "no_target": result.no_target,
            "no_target_prob": result.no_target_prob, "mask_area_fraction": result.area_fraction,
            "seconds": answer.seconds, "batch_size": answer.batch_size}
  with utils.new_directory(out) as tmp:
    shutil.copyfile(upload, os.path.join(tmp, "input" + os.path.splitext(upload)[1]))
    with open(os.path.join(tmp, "request.json"), "w", encoding="utf-8") as f:
      json.dump(record, f, ensure_ascii=False, indent=1)
    inference.save(result, request.image, os.path.join(tmp, "mask.png"))
  return out


def demo_examples(checkpoint_path: str, count: int = 8) -> list[list[str]]:
  """`[[image path, expression], ...]`: the first expression of each of the first `count`
  held-out images when `checkpoint_path` is an `unires-demo` work directory (it holds the
  ShapesParts raw data, `raw/annotations/val.json`); otherwise none."""
  raw = os.path.join(checkpoint_path, "raw")
  path = os.path.join(raw, "annotations", "val.json")
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    references = json.load(f)
  examples: dict[str, str] = {}
  for ref in references:
    if len(examples) == count:
      break
    examples.setdefault(ref["img_name"], ref["sentences"][0]["sent"])
  return [[os.path.join(raw, "images", name), text] for name, text in examples.items()]


def page(batcher: batcher_lib.Batcher, *, title: str, examples: list[list[str]],
         save_dir: str | None, max_pixels: int) -> gr.Blocks:
  """The Blocks of the demo (see the module doc); up to `batcher.segmenter.batch_size` requests
  run at once, so that those arriving together share a model call."""
  model_cfg = batcher.segmenter.config.model

  def respond(upload: str | None, text: str | None, boxes: str | None
              ) -> tuple[Any, Any, Any, str, str]:
    """-> overlay `[h, w, 3]`, mask `[h, w]` (0 / 255), proposals `[h, w, 3]`, verdict,
    details."""
    try:
      request = read_request(upload, text, boxes, model_cfg, max_pixels)
    except ValueError as e:
      return None, None, None, f"Error: {e}", ""
    answer = batcher.segment(request.image, request.text, request.boxes)
    result = answer.result
    note = details(answer)
    if save_dir:
      note += f" · saved as {os.path.basename(save_request(save_dir, upload, request, answer))}"
    return (overlays.overlay(request.image, result.mask), result.mask.astype(np.uint8) * 255,
            overlays.draw_boxes(request.image, result.boxes), inference.describe(result), note)

  with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 600)) as blocks:
    gr.Markdown(f"## {title}\nUpload an image and say what to segment: several objects, one "
                "object, a part of an object, or something that is not there.")
    with gr.Row():
      with gr.Column():
        upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
        text = gr.Textbox(label="Expression", placeholder="the wheels of the red truck",
                          elem_id="text")
        boxes = gr.Textbox(label=f"Proposal boxes in the image's pixels (optional): {BOXES_HINT}",
                           elem_id="boxes")
        button = gr.Button("Segment", variant="primary", elem_id="segment")
        if examples:
          gr.Examples(examples, inputs=[upload, text], label="Held-out images of the demo")
      with gr.Column():
        verdict = gr.Textbox(label="Verdict", interactive=False, elem_id="verdict")
        overlay = gr.Image(label="Overlay", format="png", interactive=False, buttons=_BUTTONS,
                           elem_id="overlay")
        mask = gr.Image(label="Mask", format="png", interactive=False, buttons=_BUTTONS,
                        elem_id="mask")
        proposals = gr.Image(label="Proposals (objects yellow, parts blue)", format="png",
                             interactive=False, buttons=_BUTTONS, elem_id="proposals")
        note = gr.Textbox(label="Details", interactive=False, elem_id="details")
    # Enter in the expression does what the button does; the button's event is the HTTP API's
    # one endpoint, /segment (gradio_client: `Client(url).predict(handle_file(path), text, "",
    # api_name="/segment")`).
    for trigger, visibility in ((button.click, "public"), (text.submit, "private")):
      trigger(respond, [upload, text, boxes], [overlay, mask, proposals, verdict, note],
              api_name="segment", api_visibility=visibility,
              concurrency_limit=batcher.segmenter.batch_size, concurrency_id="segment")
  return blocks
