"""Evaluators from the config (`config.evals`, as big_vision's), run during training and by
`unires-eval`.

  config.evals.refcocom_val = dict(dataset="ref_coco_m", split="val", batch_size=64,
                                   protocol="classic", resolution=0, every=5000)

Each entry is one evaluator, named by its key:
  dataset, split  a built dataset (TFDS name, with its builder config, in config.input.data_dir)
  batch_size      global rows per prediction step
  protocol        how predictions are scored (`PROTOCOLS`; formulas in `metrics`):
                    classic  RefCOCO/+/g, RefCOCOm as LAVT and CRIS score them: every expression
                             gets its mask, the no-target head is not consulted; mIoU, cIoU, Pr@X
                    rela     gRefCOCO as ReLA scores it: the no-target verdict (sigmoid of the
                             no-target logit above config.model.no_target_threshold) decides
                             "no target"; gIoU, cIoU, N-acc, T-acc, Pr@0.7..0.9
                    lisa     the verdict empties the predicted mask, and an empty prediction
                             counts as "no target", as LISA-style models are scored
  resolution      optional, default 0: score at each image's original resolution; N > 0: at N x N,
                  the prediction and the ground truth both resized to the square (ReLA and LAVT
                  score at 480 x 480; `evaluator` says how each is resized)
  every           during training, at each multiple of `every` steps (0: at the end only); the
                  trainer also runs every evaluator after its last step
Results go to `workdir/eval/<name>_<step>.json` (with the evaluator's fields) and to TensorBoard as
`eval/<name>/<metric>`.
"""

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import ml_collections

from unires_jax import utils
from unires_jax.evaluation import evaluator
from unires_jax.evaluation.metrics import PROTOCOLS

log = logging.getLogger(__name__)

FIELDS = ("dataset", "split", "batch_size", "protocol", "every")  # required
OPTIONAL = {"resolution": 0}  # field -> default (run configs written before it lack it)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One entry of `config.evals` (see the module doc)."""

  name: str
  dataset: str
  split: str
  batch_size: int
  protocol: str
  every: int
  resolution: int = 0

  def due(self, step: int) -> bool:
    """Whether training runs it after `step` (the last step aside)."""
    return self.every > 0 and step % self.every == 0


def from_config(config: ml_collections.ConfigDict) -> list[Evaluator]:
  """The evaluators of `config.evals`, by name; a ValueError names the entry and field that is
  missing, unknown or out of range."""
  out = []
  for name, entry in sorted(config.evals.items()):
    where = f"config.evals.{name}"
    if not isinstance(entry, ml_collections.ConfigDict):
      raise ValueError(f"{where} must be a dict of {FIELDS}, got {entry!r}")
    missing = [f for f in FIELDS if f not in entry]
    unknown = sorted(set(entry) - set(FIELDS) - set(OPTIONAL))
    if missing or unknown:
      raise ValueError(f"{where}: " + (f"missing field {missing[0]!r}" if missing
                                      else f"unknown field {unknown[0]!r}")
                       + f"; fields: {FIELDS}, optional: {tuple(OPTIONAL)}")
    ev = Evaluator(name, **{f: entry[f] for f in FIELDS},
                   **{f: entry.get(f, default) for f, default in OPTIONAL.items()})
    if ev.protocol not in PROTOCOLS:
      raise ValueError(f"{where}.protocol={ev.protocol!r}; protocols: {PROTOCOLS}")
    if ev.batch_size < 1 or ev.every < 0:
      raise ValueError(f"{where}: batch_size={ev.batch_size} must be >= 1 and every={ev.every} "
                       ">= 0")
    evaluator.check_resolution(ev.resolution, f"{where}.resolution")
    out.append(ev)
  return out


def result_path(workdir: str, name: str, step: int) -> str:
  """`workdir/eval/<name>_<step>.json`."""
  return os.path.join(workdir, "eval", f"{name}_{step}.json")


def write_json(result: evaluator.EvalResult, ev: Evaluator, workdir: str, step: int,
               no_target_threshold: float) -> str:
  """Writes the metrics (and baselines) of `ev` at `step`, scored at `no_target_threshold`,
  atomically on process 0; returns the path."""
  path = result_path(workdir, ev.name, step)
  if jax.process_index() == 0:
    record = {"evaluator": ev.name, "dataset": ev.dataset, "split": ev.split,
              "protocol": ev.protocol, "resolution": ev.resolution, "step": int(step),
              "no_target_threshold": float(no_target_threshold), "metrics": result.metrics}
    if result.baselines:
      record["baselines"] = result.baselines
    # NaN stays NaN (a metric without samples, e.g. N-acc on a split with no empty target).
    utils.write_atomic(path, json.dumps(record, indent=1, sort_keys=True, allow_nan=True))
  return path


def run(evaluators: list[Evaluator], config: ml_collections.ConfigDict, params: Any,
        predict: Callable, mesh, tokenize, workdir: str, step: int,
        scalars: Callable[[int, dict[str, float], str], None] | None = None
        ) -> dict[str, evaluator.EvalResult]:
  """Runs `evaluators` on `params` at training step `step`; writes each one's JSON and, through
  `scalars(step, metrics, prefix)` when given (e.g. `MetricWriter.scalars`), its TensorBoard
  scalars."""
  results = {}
  for ev in evaluators:
    t0 = time.time()
    result = evaluator.evaluate(config, params, predict, mesh, tokenize, ev.dataset, ev.split,
                                batch_size=ev.batch_size, protocol=ev.protocol,
                                resolution=ev.resolution)
    path = write_json(result, ev, workdir, step, config.model.no_target_threshold)
    log.info("eval %s (%s/%s, %s, %s) at step %d in %.0f s: %s -> %s", ev.name, ev.dataset,
             ev.split, ev.protocol, f"{ev.resolution}x{ev.resolution}" if ev.resolution
             else "original size", step, time.time() - t0, evaluator.headline(result.metrics),
             path)
    if scalars is not None:
      scalars(step, result.metrics, f"eval/{ev.name}/")
    results[ev.name] = result
  return results
