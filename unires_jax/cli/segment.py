"""unires-segment: masks of what sentences refer to in images, from a trained checkpoint.

  unires-segment --checkpoint=CKPT --image=PATH --text=TEXT --out=mask.png [--boxes=JSON]
  unires-segment --checkpoint=CKPT --batch=FILE.jsonl --out_dir=DIR [--detector=OWLV2_DIR]
      [--quantize=int8|int4]

Segments what a sentence refers to (`unires_jax.inference`). CKPT is a training work directory
(its latest checkpoint, or `--step`) or a converted checkpoint. Each input gives a mask PNG at the
image's size (0 or 255; empty for a no-target verdict), the image with the mask tinted beside it
(`mask.png` -> `mask_overlay.png`), and a printed line:

  cup.jpg "the red cup": target (no-target p=0.12), mask 5.3% of the image -> mask.png

`--boxes='{"object": [[x1, y1, x2, y2], ...], "part": [...]}'` gives proposals in the image's
pixels. Inputs without boxes get the proposals of `--detector` (an OWLv2 directory, with the
settings of the checkpoint config's `proposals` section, as `unires-propose` makes them for
datasets); without a detector the whole image is the one object proposal (the line says so).

`--batch`: one `{"image": PATH, "text": TEXT}` object per line, `"boxes"` optional, PATH relative
to the file; blank lines are skipped. Writes DIR/000000.png, 000001.png, ... (one per line, in
order), their overlays, and DIR/results.jsonl, a record per line: image, text, no_target,
no_target_prob, mask, overlay (file names in DIR), mask_area_fraction, proposals (given,
detector or whole_image). Every line is
checked before the model runs; the model runs `--batch_size` lines at a time, the last batch
padded (one compiled shape). Files are replaced atomically.
"""

import json
import logging
import os

from absl import app, flags

from unires_jax.cli import common

_IMAGE = flags.DEFINE_string("image", None, "Image file to segment.")
_TEXT = flags.DEFINE_string("text", None, "The referring expression (with --image).")
_BOXES = flags.DEFINE_string("boxes", None,
                             'Proposals as JSON {"object": [[x1, y1, x2, y2], ...], "part": '
                             "[...]} in the image's pixels (default: --detector's, else the "
                             "whole image).")
_BATCH = flags.DEFINE_string("batch", None, "JSON-lines file of (image, text[, boxes]) inputs.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder (with --batch).")

log = logging.getLogger(__name__)


def _check_flags() -> None:
  """One mode, with its own flags."""
  if bool(_IMAGE.value) == bool(_BATCH.value):
    raise app.UsageError("give either --image (with --text and --out) or --batch (with --out_dir)")
  mode, needed, unused = (
      ("--image", (_TEXT, common.OUT), (_OUT_DIR,)) if _IMAGE.value
      else ("--batch", (_OUT_DIR,), (_TEXT, common.OUT, _BOXES)))
  for flag in needed:
    if flag.value is None:
      raise app.UsageError(f"{mode} needs --{flag.name}")
  for flag in unused:
    if flag.value is not None:
      raise app.UsageError(f"--{flag.name} does not go with {mode}")
  if common.OUT.value and not common.OUT.value.endswith(".png"):
    raise app.UsageError(f"--out={common.OUT.value} must name a .png file")


def _requests(model_cfg) -> list:
  from unires_jax import inference

  if _BATCH.value:
    return inference.read_requests(_BATCH.value, model_cfg)
  boxes = None
  if _BOXES.value is not None:
    try:
      boxes = inference.parse_boxes(json.loads(_BOXES.value), model_cfg, "--boxes")
    except json.JSONDecodeError as e:
      raise ValueError(f"--boxes is not JSON ({e})") from None
  return [inference.request(_IMAGE.value, _TEXT.value, "--image", boxes=boxes)]


def _verdict(request, result, mask_path: str) -> str:
  """`cup.jpg "the red cup": target (no-target p=0.12), mask 5.3% of the image -> mask.png`"""
  from unires_jax import inference

  found = inference.describe(result)
  note = {"given": "", "detector": "; proposals from the detector",
          "whole_image": "; no boxes given, the whole image is the proposal"}[result.proposals]
  text = json.dumps(request.text, ensure_ascii=False)
  return f"{request.image} {text}: {found} -> {mask_path}{note}"


def main(argv) -> int:
  common.start(argv)
  common.require(common.CHECKPOINT)
  _check_flags()
  from unires_jax import checkpoint, inference, utils

  try:
    config = checkpoint.locate(common.CHECKPOINT.value, common.STEP.value).config()
    requests = _requests(config.model)
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  detector = common.load_detector(config, common.DETECTOR.value) if common.DETECTOR.value else None
  segmenter = inference.Segmenter.from_checkpoint(
      common.CHECKPOINT.value, step=common.STEP.value,
      batch_size=min(common.BATCH_SIZE.value, len(requests)),
      no_target_threshold=common.NO_TARGET_THRESHOLD.value, detector=detector,
      quantize=common.QUANTIZE.value)
  log.info("%d inputs in batches of %d on %d devices", len(requests), segmenter.batch_size,
           segmenter.mesh.size)
  if _BATCH.value:
    paths = [os.path.join(_OUT_DIR.value, f"{i:06d}.png") for i in range(len(requests))]
  else:
    paths = [common.OUT.value]
  os.makedirs(os.path.dirname(paths[0]) or ".", exist_ok=True)
  records = []
  for start in range(0, len(requests), segmenter.batch_size):
    chunk = requests[start:start + segmenter.batch_size]
    try:  # the header was read before the model ran; a damaged file shows only now
      images = [inference.read_image(r.path) for r in chunk]
    except ValueError as e:
      raise app.UsageError(f"{e}; stopped after {start} of {len(requests)} inputs") from None
    results = segmenter.segment(images, [r.text for r in chunk], [r.boxes for r in chunk])
    for k, (request, image, result) in enumerate(zip(chunk, images, results), start):
      inference.save(result, image, paths[k])
      count = f"[{k + 1}/{len(requests)}] " if _BATCH.value else ""
      print(count + _verdict(request, result, paths[k]), flush=True)
      records.append({
          "image": request.image, "text": request.text, "no_target": result.no_target,
          "no_target_prob": result.no_target_prob, "mask": os.path.basename(paths[k]),
          "overlay": os.path.basename(inference.overlay_path(paths[k])),
          "mask_area_fraction": result.area_fraction, "proposals": result.proposals})
  if _BATCH.value:
    with (utils.replacing(os.path.join(_OUT_DIR.value, "results.jsonl")) as tmp,
          open(tmp, "w", encoding="utf-8") as f):
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  return 0


FLAG_GROUPS = (
    ("model", (common.CHECKPOINT, common.STEP, common.NO_TARGET_THRESHOLD, common.BATCH_SIZE,
               common.QUANTIZE)),
    ("one image", (_IMAGE, _TEXT, _BOXES, common.OUT)),
    ("a batch", (_BATCH, _OUT_DIR)),
    ("proposals", (common.DETECTOR,)),
)


def run():
  common.run(main, "unires-segment", __doc__, FLAG_GROUPS)


if __name__ == "__main__":
  run()
