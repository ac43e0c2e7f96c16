"""The no-target threshold, chosen on a calibration split and stored with the checkpoint.

The model says "no target" when the sigmoid of its no-target logit is above
`config.model.no_target_threshold`. The head's losses correct for the share of no-target
sentences (`loss.no_target_prior`), so in expectation 0.5 weighs both kinds of error alike; a
given run's scores still sit off that centre by an amount that varies from run to run
(`docs/demo.md`: at 0.5 the demo's N-acc ranged 0.80-0.92 over seeds while its scores separated
with ROC AUC near 0.98). `calibrate` scores a split the model did not train on (for the demo, the
first images of the training split, which its training mixture leaves out: never the held-out
split that is reported), picks the threshold with the best balanced accuracy there
((N-acc + T-acc) / 2, so both kinds of error still weigh alike) and `save` writes it beside the
checkpoint (`checkpoint.Located.calibration_path`). From then on `checkpoint.Located.config()`
gives it as `model.no_target_threshold`: `unires-eval`, `unires-segment`, `unires-serve` and
`Segmenter.from_checkpoint` use it unless a threshold is given explicitly (`--no_target_threshold`,
or `--config` with its own `model.no_target_threshold`).

The trainer calibrates after its last step when `config.calibration.split` is set.
"""

import json
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from unires_jax import checkpoint, parallel, utils
from unires_jax.data import pipeline, schema
from unires_jax.evaluation import evaluator
from unires_jax.models.unires import INPUT_KEYS

_NONE = schema.GRANULARITIES.index("none")


class CalibrationError(ValueError):
  """The calibration split cannot choose a threshold (it lacks one kind of expression)."""


def scores(config: ml_collections.ConfigDict, params, predict: Callable, mesh, tokenize,
           dataset: str, split: str, *, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The no-target logits and labels of every expression of `dataset`/`split`, gathered from
  every process: `([expressions] float32 logits, [expressions] bool "has no target")`."""
  local_batch = pipeline.ProcessShard.current().batch_size(batch_size)
  data = pipeline.eval_dataset(config, dataset, split, tokenize, batch_size=local_batch)
  logits, labels = [], []
  for batch in evaluator.batches_in_step(data):
    inputs = parallel.shard_batch({k: batch[k] for k in INPUT_KEYS}, mesh)
    out = evaluator.local_rows(predict(params, inputs), mesh)
    valid = np.flatnonzero(batch["valid"])
    logits.append(np.asarray(out["no_target_logits"], np.float32)[valid])
    labels.append(np.asarray(batch["granularity"])[valid] == _NONE)
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  if jax.process_count() > 1:  # every process gets every score (counts differ: pad, then cut)
    counts = multihost_utils.process_allgather(np.array([len(logits)]))
    most = int(np.max(counts))
    pad = most - len(logits)
    gathered = multihost_utils.process_allgather(
        np.stack([np.pad(logits, (0, pad)), np.pad(labels, (0, pad)).astype(np.float32)]))
    logits = np.concatenate([g[0, :int(n)] for g, n in zip(gathered, counts.ravel())])
    labels = np.concatenate([g[1, :int(n)] for g, n in zip(gathered, counts.ravel())]) > 0.5
  return logits, labels


def best_threshold(logits: np.ndarray, no_target: np.ndarray) -> float:
  """The logit threshold t ("no target" iff logit > t) with the best balanced accuracy.

  Args:
    logits: `[n]` no-target logits.
    no_target: `[n]` bool, the expressions that have no target.

  Among equally good thresholds the one nearest 0 (the prior-corrected default) wins; t lies
  halfway between the two scores it separates.
  """
  logits, no_target = np.asarray(logits, np.float64), np.asarray(no_target, bool)
  if no_target.all() or not no_target.any():
    raise CalibrationError(f"calibration needs expressions with and without a target; got "
                     f"{int(no_target.sum())} of {len(no_target)} without")
  values = np.unique(logits)
  # Candidates: below every score, and halfway between each pair of neighbouring scores.
  candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2,
                               [values[-1] + 1.0]])
  # Counted by binary search in the sorted scores of each kind: O(n log n) for any split size.
  none, some = np.sort(logits[no_target]), np.sort(logits[~no_target])
  n_acc = 1 - np.searchsorted(none, candidates, side="right") / len(none)
  t_acc = np.searchsorted(some, candidates, side="right") / len(some)
  balanced = (n_acc + t_acc) / 2
  best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
  return float(candidates[best[np.argmin(np.abs(candidates[best]))]])


def accuracies(logits: np.ndarray, no_target: np.ndarray, logit_threshold: float
               ) -> dict[str, float]:
  """N-acc and T-acc of the verdict "no target" iff logit > `logit_threshold`."""
  said_none = np.asarray(logits) > logit_threshold
  no_target = np.asarray(no_target, bool)
  return {"N-acc": float(said_none[no_target].mean()),
          "T-acc": float((~said_none[~no_target]).mean())}


def sources(ccfg: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(dataset, split) pairs of `config.calibration`: `dataset` and `split` are one name each, or
  as many comma-separated (a fine-tuning mixture's: "ref_custom,ref_coco_m" with
  "train[:20%],train[:7%]"); a split's own "+" and "[a:b]" are TFDS's."""
  datasets, splits = ccfg.dataset.split(","), ccfg.split.split(",")
  if len(datasets) != len(splits) or not all(datasets) or not all(splits):
    raise ValueError(f"config.calibration: dataset={ccfg.dataset!r} and split={ccfg.split!r} "
                     "must name as many non-empty items, comma-separated")
  return list(zip(datasets, splits))


def calibrate(config: ml_collections.ConfigDict, params, predict: Callable, mesh, tokenize,
              step: int | None) -> dict[str, Any]:
  """The calibration record of `params` on `config.calibration` (its datasets and splits, see
  `sources`, and batch size): the chosen `no_target_threshold` (a probability), its logit, and
  N-acc / T-acc on the splits together at it and at the config's own threshold."""
  ccfg = config.calibration
  scored = [scores(config, params, predict, mesh, tokenize, dataset, split,
                   batch_size=ccfg.batch_size) for dataset, split in sources(ccfg)]
  logits = np.concatenate([s[0] for s in scored])
  no_target = np.concatenate([s[1] for s in scored])
  logit = best_threshold(logits, no_target)
  default = float(config.model.no_target_threshold)
  return {
      "no_target_threshold": float(1 / (1 + np.exp(-logit))),
      "logit": logit,
      "dataset": ccfg.dataset,
      "split": ccfg.split,
      "step": step,
      "expressions": int(len(logits)),
      "no_target_expressions": int(no_target.sum()),
      "calibrated": accuracies(logits, no_target, logit),
      "at_config_threshold": {"no_target_threshold": default,
                              **accuracies(logits, no_target, np.log(default / (1 - default)))},
  }


def describe(record: dict[str, Any]) -> str:
  """One line: the chosen threshold, its split, and N-acc / T-acc there at it and at the
  config's threshold."""
  at, default = record["calibrated"], record["at_config_threshold"]
  return (f"no-target threshold {record['no_target_threshold']:.3f}, calibrated on "
          f"{record['split']} (N-acc {at['N-acc']:.3f}, T-acc {at['T-acc']:.3f} there; at "
          f"{default['no_target_threshold']}: {default['N-acc']:.3f}, {default['T-acc']:.3f})")


def save(record: dict[str, Any], where: checkpoint.Located) -> str:
  """Writes `record` beside the checkpoint `where` (atomically); returns the path."""
  path = where.calibration_path
  utils.write_atomic(path, json.dumps(record, indent=2) + "\n")
  return path


def applied(config: ml_collections.ConfigDict, record: dict[str, Any] | None
            ) -> ml_collections.ConfigDict:
  """`config` with the record's threshold as `model.no_target_threshold` (a copy; `config`
  itself when there is no record)."""
  if record is None:
    return config
  config = config.copy_and_resolve_references()
  config.model.no_target_threshold = float(record["no_target_threshold"])
  return config
