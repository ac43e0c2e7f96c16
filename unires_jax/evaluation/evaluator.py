"""Evaluation of a model on a built dataset split: predictions at the scoring resolution,
`RESMetrics` under the evaluator's protocol, the trivial baselines, and a few examples for
overlays.

Every expression of the split is predicted once (the pipeline pads the last batch with
`valid = 0` rows, which are dropped). The ground truth is the union of the expression's target
masks as stored in the dataset, at the image's original size. A predicted mask goes back to the
image's geometry by undoing the letterbox: the logits of the high-resolution view are cropped to
the image's region (`original_size * scale`, top-left), resized bilinearly (PIL's
`Image.BILINEAR` on float logits, antialiased when shrinking), then thresholded at 0.

Scoring resolution (`resolution`): 0 scores at the original size (the crop resized to it, the
ground truth as stored). N > 0 scores on an N x N square, as ReLA and LAVT score at 480 x 480
after resizing every image to the square, aspect ratio not kept:
  * prediction: the cropped logits resized bilinearly to N x N, then thresholded at 0 (ReLA
    `GRES.py` and LAVT `lib/_utils.py` resize their logits bilinearly to the 480 x 480 input before
    the argmax; our logits come from a letterboxed view, so the crop is resized instead);
  * ground truth: the original-size mask resized to N x N by nearest neighbour (PIL's
    `Image.NEAREST`, as LAVT's `transforms.Resize` resizes its target; ReLA rasterises its
    polygons on the resized grid, which nearest neighbour approximates).
The baselines' masks are made at the original size and resized like the ground truth. Examples
for overlays stay at the original size.

With several processes, each evaluates the images of its own shard; the metric sums are then
summed over processes, so every process returns the same result.
"""

import dataclasses
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from unires_jax import parallel
from unires_jax.data import pipeline, schema
from unires_jax.evaluation import baselines
from unires_jax.evaluation.metrics import RESMetrics
from unires_jax.models.unires import INPUT_KEYS


@dataclasses.dataclass
class Example:
  """One evaluated expression, kept for overlays."""

  image: np.ndarray  # [h, w, 3] uint8
  text: str
  granularity: str
  pred_mask: np.ndarray  # [h, w] bool
  gt_mask: np.ndarray  # [h, w] bool
  pred_no_target: bool


@dataclasses.dataclass
class EvalResult:
  metrics: dict[str, float]
  baselines: dict[str, dict[str, float]]
  examples: list[Example]


def check_resolution(resolution, name: str = "resolution") -> int:
  """`resolution` (0: the original size, N: N x N), or a ValueError naming it `name`."""
  if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 0:
    raise ValueError(f"{name}={resolution!r} must be an int >= 0 (0: the original image, "
                     "N: N x N)")
  return resolution


def resize_prediction(mask_logits: np.ndarray, original_size, scale: float,
                      size: tuple[int, int]) -> np.ndarray:
  """Logits `[s_high, s_high]` of the letterboxed view -> bool `size` (height, width): the image's
  region cropped, resized bilinearly, thresholded at 0."""
  h, w = int(original_size[0]), int(original_size[1])
  vh, vw = max(1, round(h * float(scale))), max(1, round(w * float(scale)))
  region = np.ascontiguousarray(mask_logits[:vh, :vw], np.float32)
  out_h, out_w = int(size[0]), int(size[1])
  if (vh, vw) != (out_h, out_w):
    region = np.asarray(Image.fromarray(region, mode="F").resize((out_w, out_h), Image.BILINEAR))
  return region > 0


def to_original(mask_logits: np.ndarray, original_size, scale: float) -> np.ndarray:
  """Logits `[s_high, s_high]` of the letterboxed view -> bool `[h, w]` at the original size."""
  return resize_prediction(mask_logits, original_size, scale, original_size)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Bool `[h, w]` -> bool `[size, size]` by nearest neighbour (PIL's `Image.NEAREST`)."""
  image = Image.fromarray(np.asarray(mask, np.uint8))
  return np.asarray(image.resize((size, size), Image.NEAREST)) != 0


class GroundTruth:
  """Reads the examples of a split on demand (in order, so one cached image suffices)."""

  def __init__(self, source):
    self._source, self._index, self._example, self._rows = source, None, None, {}

  def example(self, index: int) -> dict[str, Any]:
    if index != self._index:
      self._index, self._example = index, self._source[index]
      ids = np.asarray(self._example["expressions"]["id"])
      self._rows = {int(i): k for k, i in enumerate(ids)}
    return self._example

  def expression(self, index: int, expression_id: int) -> tuple[str, np.ndarray]:
    """(text, ground-truth mask `[h, w]` bool) of an expression of image `index`."""
    example = self.example(index)
    k = self._rows[expression_id]
    exprs = example["expressions"]
    h, w = np.asarray(example["image"]).shape[:2]
    mask = np.zeros((h, w), bool)
    for t in np.asarray(exprs["target_indices"][k], np.int64):
      mask |= np.asarray(example["targets"]["mask"][t])[..., 0] != 0
    text = exprs["text"][k]
    return (text.decode() if isinstance(text, bytes) else str(text)), mask


def local_rows(outputs: dict[str, jax.Array], mesh) -> dict[str, np.ndarray]:
  """This process's rows of globally sharded outputs, as NumPy."""
  local = multihost_utils.global_array_to_host_local_array(
      outputs, mesh, jax.sharding.PartitionSpec(parallel.mesh.BATCH_AXES))
  return {k: np.asarray(v) for k, v in local.items()}


def batches_in_step(dataset: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
  """The dataset's batches, then padding (`valid = 0`) until every process is done, so all
  processes run the same number of (collective) prediction steps."""
  template = None
  for batch in dataset:
    template = template or {k: v for k, v in batch.items()}
    if not _all_done(False):
      yield batch
  while template is not None and not _all_done(True):
    yield {**template, "valid": np.zeros_like(template["valid"])}
  if template is None:
    raise ValueError("this process's share of the evaluation split is empty")


def _all_done(done: bool) -> bool:
  if jax.process_count() == 1:
    return done
  return bool(np.all(multihost_utils.process_allgather(np.array(done))))


def evaluate(config, params, predict: Callable, mesh, tokenize, dataset: str, split: str, *,
             batch_size: int, protocol: str, resolution: int = 0, with_baselines: bool = False,
             num_examples: int = 0, progress: Callable[[int], None] | None = None
             ) -> EvalResult:
  """Metrics of `predict(params, batch)` (see `unires_jax.parallel.make_predict`) on a split.

  Args:
    config: the full config (`config.input` for the data, `config.model.no_target_threshold`).
    dataset, split: the dataset (`pipeline.dataset_dir` naming) and split.
    batch_size: global rows per prediction step.
    protocol: how predictions are scored (`metrics.PROTOCOLS`).
    resolution: 0 scores at each image's original size, N > 0 on N x N (see the module doc).
    with_baselines: also score the trivial baselines (whole image; largest proposal).
    num_examples: keep this many evaluated expressions (this process's first) for overlays.
    progress: called with the number of expressions done after each batch.
  """
  check_resolution(resolution)
  metrics = RESMetrics(protocol)
  base = {"whole_image": RESMetrics(protocol), "largest_proposal": RESMetrics(protocol)}
  local_batch = pipeline.ProcessShard.current().batch_size(batch_size)
  data = pipeline.eval_dataset(config, dataset, split, tokenize, batch_size=local_batch)
  truth = GroundTruth(pipeline.open_source(dataset, split, config.input.data_dir))
  threshold = float(config.model.no_target_threshold)
  logit_threshold = np.log(threshold / (1 - threshold))
  examples, done = [], 0
  for batch in batches_in_step(data):
    inputs = parallel.shard_batch({k: batch[k] for k in INPUT_KEYS}, mesh)
    out = local_rows(predict(params, inputs), mesh)
    for row in np.flatnonzero(batch["valid"]):
      index, expression_id = int(batch["image_index"][row]), int(batch["expression_id"][row])
      text, gt = truth.expression(index, expression_id)
      granularity = schema.GRANULARITIES[int(batch["granularity"][row])]
      logits, original_size, scale = (out["mask_logits"][row], batch["original_size"][row],
                                      batch["scale"][row])
      gt_scored = _at_resolution(gt, resolution)
      pred = resize_prediction(logits, original_size, scale, gt_scored.shape)
      no_target = bool(out["no_target_logits"][row] > logit_threshold)
      metrics.update(pred, gt_scored, granularity, pred_no_target=no_target)
      if with_baselines:
        example = truth.example(index)
        h, w = gt.shape
        proposals = example["proposals"]
        for name, mask in (
            ("whole_image", baselines.whole_image(h, w)),
            ("largest_proposal", baselines.largest_proposal(
                proposals["object_boxes"], proposals["part_boxes"], h, w))):
          base[name].update(_at_resolution(mask, resolution), gt_scored, granularity, False)
      if len(examples) < num_examples:
        if resolution:
          pred = to_original(logits, original_size, scale)
        examples.append(Example(np.asarray(truth.example(index)["image"]), text, granularity,
                                pred, gt, no_target))
      done += 1
    if progress is not None:
      progress(done)
  return EvalResult(
      metrics=_merged(metrics).result(),
      baselines={k: _merged(v).result() for k, v in base.items()} if with_baselines else {},
      examples=examples)


def _at_resolution(mask: np.ndarray, resolution: int) -> np.ndarray:
  """An original-size mask as scored: itself (resolution 0) or resized to the square."""
  return mask if resolution == 0 else resize_mask(mask, resolution)


def _merged(metrics: RESMetrics) -> RESMetrics:
  """The metrics summed over processes. The float64 sums travel as bytes: JAX collectives
  would narrow them to float32 without `jax_enable_x64`."""
  if jax.process_count() == 1:
    return metrics
  state = metrics.state()
  keys = sorted(state)
  local = np.array([float(state[k]) for k in keys], np.float64).view(np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(local), np.uint8)
  sums = gathered.reshape(jax.process_count(), -1).copy().view(np.float64).sum(axis=0)
  return RESMetrics.from_state(dict(zip(keys, sums)), metrics.protocol)


def headline(metrics: dict[str, float]) -> str:
  keys = ("mIoU", "cIoU", "gIoU", "N-acc", "T-acc")
  return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


def format_table(columns: dict[str, dict[str, float]],
                 keys: tuple[str, ...] = ("mIoU", "cIoU", "gIoU", "Pr@0.5", "N-acc", "T-acc")
                 ) -> str:
  """A text table: one row per (granularity, metric), one column per `columns` entry."""
  groups = [""] + [f"{g}/" for g in schema.GRANULARITIES]
  names = list(columns)
  width = max(12, *(len(n) for n in names))
  lines = [f"{'metric':<16}" + "".join(f"{n:>{width + 2}}" for n in names)]
  for group in groups:
    for key in keys:
      full = group + key
      if not any(full in c for c in columns.values()):
        continue
      cells = []
      for n in names:
        value = columns[n].get(full)
        cells.append(f"{'-':>{width + 2}}" if value is None or np.isnan(value)
                     else f"{value:>{width + 2}.3f}")
      lines.append(f"{full:<16}" + "".join(cells))
  return "\n".join(lines)
