"""Referring segmentation of raw images with a trained or converted checkpoint.

`Segmenter.from_checkpoint(path)` restores the parameters onto this host's devices;
`segment(images, texts, boxes)` returns one `Result` per (image, text) pair: the mask at the
image's own size and the no-target verdict.

An input goes through the data pipeline's own preprocessing (`data.preprocess`) as a schema
example with one expression and no targets, so it is letterboxed, normalised and tokenized as in
training and evaluation. The mask comes back as the evaluator makes it (`evaluator.to_original`:
the image's region of the letterboxed logits, resized bilinearly to the original size, then > 0),
and the verdict by the evaluator's rule (sigmoid of the no-target logit above
`config.model.no_target_threshold`). A no-target verdict empties the mask.

Proposals: the model scores the expression against object and part proposal boxes. Boxes given
in the original image's pixels (x1, y1, x2, y2) are scaled with the letterbox; without boxes, a
`detector` (`propose.Detector`, OWLv2) proposes them, as `unires-propose` does for datasets (the
first `max_objects` / `max_parts` it finds; none found: the no-target head falls back on the
text prior, `models.no_target`); without a detector the whole image is the one object proposal
(`Result.proposals` says which).

Parameters: read in the compute dtype (`inference_config`: `model.param_dtype` set to
`model.dtype`, bfloat16 in the 7B recipe), cast as Orbax reads them, so the float32 master
weights that training keeps (7B: 29.4 GB; 14.7 GB in bfloat16) never reach a device.

Quantized weights (`quantize="int8"` / `"int4"`, `--quantize` of the commands): the linear
layers of `config.model.quantize.parts` (the LLM and the CLIP ViT by default) hold their kernels
as integers with a scale per output channel (`models.quantize`, qwix); a float checkpoint is
quantized as it loads, one written by `unires-convert quantize` loads as it is stored.

Mesh: the local devices on the `fsdp` axis (`data=1, fsdp=n, tensor=1`), whatever mesh the
checkpoint was trained on (a checkpoint restores onto any mesh). The rows of a batch are split
over the devices as data parallelism would split them, but the parameters are sharded instead of
copied, so a model larger than one device's memory (7B in float32: 28 GB) runs on one host; on
one device this is plain single-device inference. Every model call has `batch_size` rows (a
multiple of the device count), the last batch padded, so one compiled shape serves all calls.
"""

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from unires_jax import checkpoint, parallel, propose, utils
from unires_jax.data import preprocess, tokenizer
from unires_jax.evaluation import evaluator, overlays
from unires_jax.models import quantize as quantize_lib
from unires_jax.models.unires import INPUT_KEYS

log = logging.getLogger(__name__)


def inference_config(config: ml_collections.ConfigDict,
                     quantize: str | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` whose parameters are in the compute dtype (`model.param_dtype =
  model.dtype`): the model computes in `model.dtype` either way, so inference needs no float32
  master weights, and `checkpoint.restore_params` casts to the abstract parameters' dtype while
  it reads. A float32 model (tiny, demo) is unchanged. `quantize` ("none", "int8", "int4"), when
  given, sets `model.quantize.weights` (`models.quantize`; `restore` explains what loads)."""
  config = config.copy_and_resolve_references()
  config.model.param_dtype = config.model.dtype
  if "quantize" not in config.model:  # a config written before quantization existed
    config.model.quantize = ml_collections.ConfigDict(quantize_lib.DEFAULTS)
  if quantize is not None:
    config.model.quantize.weights = quantize
  quantize_lib.enabled(config.model)  # checks the settings
  return config


def restore(path: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
            step: int | None = None) -> tuple[parallel.ShardedModel, Any, int | None]:
  """(model, params, step): the model of `config` on `mesh` and the parameters of the checkpoint
  `checkpoint.locate` finds under `path`, restored for it.

  The checkpoint's own config says how its weights are stored. Float weights restore in the
  compute dtype and, when `config.model.quantize` asks for int8 / int4, are quantized on the
  devices as they arrive (the float copy is donated). Quantized weights (`unires-convert
  quantize`) restore as they are, under their own `model.quantize` settings, whatever `config`
  says unless it asks for another type, which is an error: they cannot be re-quantized.
  """
  stored_model = checkpoint.locate(path, step).config().model
  stored = quantize_lib.weights(stored_model)
  wanted = config.model.quantize.weights
  if stored != "none":
    if wanted not in ("none", stored):
      raise ValueError(f"{path} holds {stored} weights (unires-convert quantize), which cannot "
                       f"become {wanted}: quantize its float checkpoint instead, or drop "
                       "--quantize")
    config = config.copy_and_resolve_references()
    config.model.quantize = stored_model.quantize
  model = parallel.ShardedModel(config, mesh)
  if stored != "none" or wanted == "none":
    params, step = checkpoint.restore_params(path, model.abstract_sharded(), step)
    return model, params, step
  float_config = config.copy_and_resolve_references()
  float_config.model.quantize.weights = "none"
  float_model = parallel.ShardedModel(float_config, mesh)
  params, step = checkpoint.restore_params(path, float_model.abstract_sharded(), step)
  log.info("quantizing the weights of %s to %s (config.model.quantize.parts=%s)", path, wanted,
           config.model.quantize.parts)
  return model, model.quantized(float_model.graphdef, params), step


BOX_KINDS = ("object", "part")
PROPOSAL_SOURCES = ("given", "detector", "whole_image")
DEFAULT_BATCH_SIZE = 8  # rows per model call, rounded up to a multiple of the devices
Boxes = dict[str, np.ndarray]  # {"object": [n, 4], "part": [m, 4]} float32 x1, y1, x2, y2


@dataclasses.dataclass(frozen=True)
class Result:
  """The prediction for one (image, text) pair.

  mask:            [height, width] bool at the image's size; empty when `no_target`
  no_target:       the expression refers to nothing in the image
  no_target_prob:  sigmoid of the no-target logit
  proposals:       where the proposals came from (`PROPOSAL_SOURCES`): given with the input,
                   found by the detector, or the whole image as the one object proposal
  boxes:           the proposals the model saw, in the image's pixels (`Boxes`)
  """

  mask: np.ndarray
  no_target: bool
  no_target_prob: float
  proposals: str
  boxes: Boxes

  @property
  def area_fraction(self) -> float:
    return float(self.mask.mean())


def parse_boxes(value: Any, model_cfg: ml_collections.ConfigDict, where: str) -> Boxes:
  """`{"object": [[x1, y1, x2, y2], ...], "part": [...]}` (a key may be left out) -> `Boxes`.

  Raises a ValueError naming `where` for another form, an empty set, or more boxes of a kind
  than the model has slots for (`model_cfg.max_objects`, `model_cfg.max_parts`).
  """
  form = '{"object": [[x1, y1, x2, y2], ...], "part": [...]}'
  if not isinstance(value, dict) or set(value) - set(BOX_KINDS):
    raise ValueError(f"{where}: boxes must be {form}, got {value!r}")
  out = {}
  for kind, limit in (("object", model_cfg.max_objects), ("part", model_cfg.max_parts)):
    try:
      boxes = np.asarray(value.get(kind, []), np.float32)
    except (TypeError, ValueError):
      boxes = None
    if boxes is None or (boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4)):
      raise ValueError(f"{where}: {kind} boxes must be [[x1, y1, x2, y2], ...], "
                       f"got {value[kind]!r}")
    boxes = boxes.reshape(-1, 4)
    if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
      raise ValueError(f"{where}: {kind} boxes need x1 <= x2 and y1 <= y2, got {value[kind]!r}")
    if len(boxes) > limit:
      raise ValueError(f"{where}: {len(boxes)} {kind} boxes, the model takes at most {limit} "
                       f"(config.model.max_{kind}s)")
    out[kind] = boxes
  if not any(len(b) for b in out.values()):
    raise ValueError(f"{where}: no box given; leave the boxes out to use the whole image")
  return out


def local_mesh() -> jax.sharding.Mesh:
  """This host's devices on the `fsdp` axis (see the module doc)."""
  return parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.local_devices())


class Segmenter:
  """Masks and no-target verdicts of restored parameters (see the module doc).

  Args:
    model: the `ShardedModel` on the mesh that holds `params`.
    params: the model's parameters, sharded as `model.shardings`.
    tokenize: texts -> token ids (`tokenizer.load_tokenize(config.input.tokenizer)`).
    batch_size: rows of every model call, rounded up to a multiple of the batch's shards.
    no_target_threshold: predict "no target" when the sigmoid of the no-target logit is above
      it; default `config.model.no_target_threshold`.
    detector: proposes boxes for inputs given without (None: the whole image is the proposal).
  """

  def __init__(self, model: parallel.ShardedModel, params: Any, tokenize, *,
               batch_size: int = DEFAULT_BATCH_SIZE, no_target_threshold: float | None = None,
               detector: propose.Detector | None = None):
    config = model.config
    self.config, self.mesh, self.params = config, model.mesh, params
    self.detector = detector
    self._spec = preprocess.sample_spec(config.model, config.input)
    self._tokenize = tokenize
    self._predict = parallel.make_predict(model)
    shards = parallel.mesh.batch_rows(self.mesh)
    self.batch_size = -(-int(batch_size) // shards) * shards
    if no_target_threshold is None:
      no_target_threshold = config.model.no_target_threshold
    if not 0 < no_target_threshold < 1:
      raise ValueError(f"no_target_threshold={no_target_threshold} must be in (0, 1)")
    self.no_target_threshold = float(no_target_threshold)

  @classmethod
  def from_checkpoint(cls, path: str, *, step: int | None = None, quantize: str | None = None,
                      **kwargs) -> "Segmenter":
    """The model of a training work directory (its latest checkpoint, or `step`) or of a
    converted checkpoint (`checkpoint.locate`), on `local_mesh()`, its weights quantized to
    `quantize` ("int8", "int4"; `restore`); `kwargs` go to `__init__`."""
    config = inference_config(checkpoint.locate(path, step).config(), quantize)
    model, params, _ = restore(path, config, local_mesh(), step)
    return cls(model, params, tokenizer.load_tokenize(config.input.tokenizer), **kwargs)

  def segment(self, images: Sequence[np.ndarray], texts: Sequence[str],
              boxes: Sequence[Any] | None = None) -> list[Result]:
    """One `Result` per (image, text) pair.

    Args:
      images: `[height, width, 3]` uint8 each.
      texts: the referring expression of each image.
      boxes: per image, proposals in the image's pixels, as `parse_boxes` reads them, or None
        (the detector's, or else the whole image as the proposal).
    """
    boxes = [None] * len(images) if boxes is None else list(boxes)
    if not len(images) == len(texts) == len(boxes):
      raise ValueError(f"{len(images)} images, {len(texts)} texts and {len(boxes)} box sets")
    sources = ["given" if b is not None else "detector" if self.detector else "whole_image"
               for b in boxes]
    results = []
    for start in range(0, len(images), self.batch_size):
      rows = range(start, min(start + self.batch_size, len(images)))
      checked = {i: _checked_image(images[i], f"input {i}") for i in rows}
      detect = [i for i in rows if sources[i] == "detector"]
      found = dict(zip(detect, self.detector([checked[i] for i in detect]) if detect else []))
      samples, used = [], []
      for i in rows:
        h, w = checked[i].shape[:2]
        if sources[i] == "given":
          image_boxes = parse_boxes(boxes[i], self.config.model, f"input {i}")
        elif sources[i] == "detector":  # none found is allowed: the no-target head's fallback
          image_boxes = {"object": found[i].object_boxes[:self.config.model.max_objects],
                         "part": found[i].part_boxes[:self.config.model.max_parts]}
        else:
          image_boxes = {"object": np.array([[0, 0, w, h]], np.float32),
                         "part": np.zeros((0, 4), np.float32)}
        samples.append(self._sample(checked[i], texts[i], image_boxes, f"input {i}"))
        used.append(image_boxes)
      results += self._predict_rows(samples, [sources[i] for i in rows], used)
    return results

  def _sample(self, image: np.ndarray, text: str, boxes: Boxes, where: str) -> dict[str, Any]:
    """The model sample of one pair (`preprocess.expand`)."""
    example = {  # the schema's fields that preprocessing reads; no targets
        "image": image,
        "targets": {"mask": []},
        "proposals": {"object_boxes": boxes["object"], "part_boxes": boxes["part"]},
        "expressions": {"text": [text], "id": [0], "target_indices": [[]], "granularity": [0],
                        "no_target": [False]},
    }
    prepared = preprocess.prepare_image(example, self._spec, self._tokenize)
    if prepared["prompt_cut"][0]:
      log.warning("%s: %r is longer than the prompt's room of %d tokens "
                  "(config.input.max_prompt_tokens, with the template %r): the model reads "
                  "only its beginning", where, text, self._spec.max_prompt_tokens,
                  self._spec.template)
    return preprocess.expand(prepared, self._spec)[0]

  def _predict_rows(self, samples: list[dict[str, Any]], sources: list[str],
                    boxes: list[Boxes]) -> list[Result]:
    """One model call on `samples`, padded to `batch_size` rows."""
    rows = samples + [preprocess.padding_like(samples[0])] * (self.batch_size - len(samples))
    batch = {k: np.stack([r[k] for r in rows]) for k in INPUT_KEYS}
    out = self._predict(self.params, parallel.shard_batch(batch, self.mesh))
    mask_logits = np.asarray(out["mask_logits"])
    no_target_logits = np.asarray(out["no_target_logits"])
    # The evaluator's rule: sigmoid(logit) > threshold, as a comparison of logits.
    threshold = np.log(self.no_target_threshold / (1 - self.no_target_threshold))
    results = []
    for i, sample in enumerate(samples):
      logit = float(no_target_logits[i])
      no_target = bool(logit > threshold)
      mask = evaluator.to_original(mask_logits[i], sample["original_size"], sample["scale"])
      results.append(Result(mask=mask & (not no_target), no_target=no_target,
                            no_target_prob=float(0.5 + 0.5 * np.tanh(logit / 2)),  # sigmoid
                            proposals=sources[i], boxes=boxes[i]))
    return results


def describe(result: Result) -> str:
  """The verdict in words: `target (no-target p=0.12), mask 5.3% of the image` or
  `no target (no-target p=0.93), empty mask`."""
  if result.no_target:
    return f"no target (no-target p={result.no_target_prob:.2f}), empty mask"
  return (f"target (no-target p={result.no_target_prob:.2f}), mask "
          f"{100 * result.area_fraction:.1f}% of the image")


def _checked_image(image: Any, where: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"{where}: expected a [height, width, 3] uint8 image, got "
                     f"{image.dtype} {image.shape}")
  return image


@dataclasses.dataclass(frozen=True)
class Request:
  """One (image, text) pair to segment, checked (`request`).

  image:  the image's path as given
  path:   where it is read from
  text:   the referring expression
  boxes:  proposals (`parse_boxes`), or None for the whole image
  """

  image: str
  path: str
  text: str
  boxes: Boxes | None


def request(image: str, text: Any, where: str, base_dir: str = "",
            boxes: Boxes | None = None) -> Request:
  """A checked `Request`: the image file exists and is an image (its header is read) and the
  text is not empty. `image` is relative to `base_dir` unless absolute. Errors name `where`."""
  path = os.path.join(base_dir, image)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: image {path} not found")
  try:
    with Image.open(path):
      pass
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f"{where}: cannot read image {path}: {e}") from None
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"{where}: the text must be a non-empty string, got {text!r}")
  return Request(image, path, text, boxes)


def read_requests(path: str, model_cfg: ml_collections.ConfigDict) -> list[Request]:
  """The requests of a JSON-lines file, all checked before any runs.

  Each non-blank line is `{"image": PATH, "text": TEXT}` with an optional `"boxes"`
  (`parse_boxes`); PATH is relative to the file's directory unless absolute. Errors name the
  file and line.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  requests = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      record = json.loads(line)
    except ValueError as e:
      raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(record, dict) or "image" not in record or "text" not in record:
      raise ValueError(f'{where}: expected {{"image": PATH, "text": TEXT[, "boxes": ...]}}, '
                       f"got {line.strip()[:200]}")
    unknown = set(record) - {"image", "text", "boxes"}
    if unknown:
      raise ValueError(f"{where}: unknown fields {sorted(unknown)} (image, text, boxes)")
    if not isinstance(record["image"], str):
      raise ValueError(f"{where}: image must be a path, got {record['image']!r}")
    boxes = record.get("boxes")
    requests.append(request(
        record["image"], record["text"], where, os.path.dirname(path),
        None if boxes is None else parse_boxes(boxes, model_cfg, where)))
  if not requests:
    raise ValueError(f"{path} holds no line to segment")
  return requests


def read_image(path: str) -> np.ndarray:
  """An image file's pixels as `[height, width, 3]` uint8 (grey, palette, alpha and CMYK become
  RGB; the EXIF orientation is not applied, as in the datasets)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None


def overlay_path(mask_path: str) -> str:
  """Where the overlay of a mask goes: `dir/mask.png` -> `dir/mask_overlay.png`."""
  return f"{os.path.splitext(mask_path)[0]}_overlay.png"


def save(result: Result, image: np.ndarray, mask_path: str) -> None:
  """Writes the mask (`[height, width]` uint8, 0 or 255) as a PNG to `mask_path` and the image
  with the mask tinted to `overlay_path(mask_path)`; each replaces an older file atomically."""
  for path, pixels in ((mask_path, result.mask.astype(np.uint8) * 255),
                       (overlay_path(mask_path), overlays.overlay(image, result.mask))):
    with utils.replacing(path) as tmp:
      Image.fromarray(pixels).save(tmp, format="PNG")
