"""Referring expression segmentation metrics: classic RES (LAVT, CRIS) and generalized RES (ReLA).

`RESMetrics` accumulates, one expression at a time, the prediction `P` and the ground truth `G`
(boolean `[H, W]` masks at the image's original resolution) and reports:

Effective prediction. `pred_no_target=True` (the model says the expression refers to nothing)
makes the effective prediction empty whatever `pred_mask` holds: P := {}. With `False` or `None`
(a model or baseline that makes no such claim) P is `pred_mask`. All metrics below use the
effective P. A sample is "empty" when G has no pixel (a gRefCOCO no-target expression).

Per sample, with I = |P ∩ G| and U = |P ∪ G| in pixels:
  IoU  = I / U                      when G is non-empty (U >= |G| > 0);
  gIoU_sample = 1 if P is empty else 0
                                    when G is empty (ReLA's convention for no-target samples).

Over a set of samples (all of them, or those of one granularity):
  mIoU  = mean IoU over the samples with non-empty G
          (LAVT `test.py`: `mIoU = np.mean(mean_IoU)` of `this_iou = I*1.0/U`; RefCOCO has no
          empty G, so "non-empty G only" is what LAVT computes there.)
  cIoU  = Σ I / Σ U over ALL samples, also called oIoU ("overall IoU")
          (LAVT: `cum_I += I`, `cum_U += U`, `overall IoU = %.2f' % (cum_I * 100. / cum_U)`; ReLA
          `refer_evaluation.py`: an empty-G sample adds its false-positive pixels to the union,
          `accum_U[src] += int(U)`, and nothing when the model predicts no-target,
          `accum_U[src] += 0`.)
  gIoU  = mean over ALL samples of IoU (non-empty G) or gIoU_sample (empty G)
          (ReLA: `accum_IoU[src] += 1` for a correctly rejected no-target sample, `+= 0` for a
          missed one, `accum_IoU[src] += this_iou` otherwise;
          `res['gIoU'] = 100. * (accum_IoU[src] / total_count[src])`.)
  N-acc = TN / (TN + FP) over the samples with empty G; TN: P empty, FP: P non-empty.
  T-acc = TP / (TP + FN) over the samples with non-empty G; TP: P non-empty, FN: P empty.
          (ReLA: `T_acc = TN / (TN + FP)`, `N_acc = TP / (TP + FN)`; ReLA names the classes
          with "no target" as the positive class, hence the swapped letters: its N_acc is the
          fraction of no-target samples predicted no-target, its T_acc the fraction of targeted
          samples predicted targeted, the same quantities as here.)
  Pr@X  = fraction of the samples with non-empty G whose IoU >= X, X in `PR_THRESHOLDS`
          (LAVT: `seg_correct[n_eval_iou] += (this_iou >= eval_seg_iou)` with
          `eval_seg_iou_list = [.5, .6, .7, .8, .9]`; ReLA: `if this_iou >= thres`. An IoU of
          exactly X counts. CRIS's `engine.py` uses `iou_list > thres` instead.)
  count = number of samples.

A metric whose denominator is zero (mIoU, T-acc or Pr@X without a non-empty-G sample, N-acc
without an empty-G sample, cIoU with Σ U = 0) is NaN. All values are fractions in [0, 1]; LAVT
and ReLA print 100 times these.

Deviations from ReLA's evaluator (github.com/henghuiding/ReLA, gres_model/evaluation/
refer_evaluation.py, commit 884ef17 "fix eval metrics"):
  * ReLA decides no-target right or wrong from its no-target flag alone; here from the
    effective prediction being empty. They agree whenever `pred_no_target=True`. They differ
    when `pred_no_target` is False/None: an empty `pred_mask` on an empty G is a TN with IoU 1
    here (ReLA: FN, IoU 0), and an empty `pred_mask` on a non-empty G is a FN here (ReLA:
    counted in T_acc as correct, with IoU 0 in both).
  * ReLA keeps the union of the raw mask when it predicts no-target on a non-empty G
    (`I = 0` but `U = |pred_mask ∪ G|`); here P is empty, so U = |G|.
  * ReLA reports T_acc = N_acc = 0 without empty samples and thresholds .7, .8, .9 only; here
    NaN and 0.5 ... 0.9.
  * G is empty when `gt_mask` has no pixel; ReLA reads the dataset's `empty` flag (the same on
    gRefCOCO, whose no-target expressions have empty merged masks).
Deviation from LAVT: LAVT averages mIoU over every sample, giving IoU 0 when U = 0; here samples
with empty G do not count in mIoU (they count in gIoU and N-acc).

Sums are int64 (pixel and sample counts, exact) and float64 (the sum of per-sample IoUs), kept
per granularity of `unires_jax.data.schema.GRANULARITIES`; the overall metrics use their totals.
"""

from collections.abc import Mapping

import numpy as np

from unires_jax.data.schema import GRANULARITIES

PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

_PR_KEYS = tuple(f"Pr@{t}" for t in PR_THRESHOLDS)
# Integer sums kept per granularity: samples, samples with non-empty ground truth, Σ I, Σ U,
# empty-G samples predicted empty (TN), non-empty-G samples predicted non-empty (TP), and the
# non-empty-G samples with IoU >= each threshold.
_COUNT_FIELDS = (
    "samples", "target_samples", "intersection", "union", "true_negatives", "true_positives",
    *_PR_KEYS)
_SAMPLES = _COUNT_FIELDS.index("samples")
_IOU_SUM_FIELD = "iou_sum"


def _check_mask(name: str, mask) -> np.ndarray:
  """`mask` as a boolean `[H, W]` array, or a ValueError naming the argument."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"{name} must be a 2-D [H, W] mask, got shape {mask.shape}")
  if mask.dtype != np.bool_:
    raise ValueError(f"{name} must be boolean, got dtype {mask.dtype} (threshold it first)")
  return mask


def _ratio(numerator: float, denominator: int) -> float:
  """numerator / denominator, NaN when the denominator is zero."""
  return float("nan") if denominator == 0 else numerator / denominator


def _metrics(counts: np.ndarray, iou_sum: float) -> dict[str, float]:
  """The metrics of one set of samples from its `_COUNT_FIELDS` sums `[n_fields]` and Σ IoU."""
  c = dict(zip(_COUNT_FIELDS, counts.tolist()))  # Python ints: exact true division.
  empty_samples = c["samples"] - c["target_samples"]
  out = {
      "mIoU": _ratio(iou_sum, c["target_samples"]),
      "cIoU": _ratio(c["intersection"], c["union"]),
      "gIoU": _ratio(iou_sum + c["true_negatives"], c["samples"]),
      "N-acc": _ratio(c["true_negatives"], empty_samples),
      "T-acc": _ratio(c["true_positives"], c["target_samples"]),
  }
  out.update({key: _ratio(c[key], c["target_samples"]) for key in _PR_KEYS})
  out["count"] = c["samples"]
  return out


def _scalar(state: Mapping[str, float], key: str, integral: bool) -> float:
  """`state[key]`, checked to be a scalar (and a whole number when `integral`)."""
  value = state[key]
  if np.ndim(value) != 0 or (integral and value != np.round(value)):
    kind = "an integral scalar" if integral else "a scalar"
    raise ValueError(f"state[{key!r}] must be {kind}, got {value!r}")
  return value


class RESMetrics:
  """Accumulates RES / GRES metrics over samples; see the module docstring for the formulas."""

  def __init__(self):
    self._counts = np.zeros((len(GRANULARITIES), len(_COUNT_FIELDS)), np.int64)
    self._iou_sums = np.zeros(len(GRANULARITIES), np.float64)

  def update(self, pred_mask, gt_mask, granularity: str = "object",
             pred_no_target: bool | None = None) -> None:
    """Adds one sample (one expression).

    Args:
      pred_mask: boolean `[H, W]` predicted mask at the image's original resolution.
      gt_mask: boolean `[H, W]` ground truth, empty for a no-target expression.
      granularity: one of `GRANULARITIES` ("object", "part", "multi", "none").
      pred_no_target: True when the model says the expression refers to nothing (the effective
        prediction is then empty whatever `pred_mask` holds); False or None: `pred_mask` counts.
    """
    pred = _check_mask("pred_mask", pred_mask)
    gt = _check_mask("gt_mask", gt_mask)
    if pred.shape != gt.shape:
      raise ValueError(
          f"pred_mask shape {pred.shape} differs from gt_mask shape {gt.shape}; resize the "
          "prediction to the image's original resolution")
    if granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if pred_no_target not in (None, True, False):
      raise ValueError(f"pred_no_target must be None or a bool, got {pred_no_target!r}")

    gt_area = np.count_nonzero(gt)
    if pred_no_target:
      pred_area = intersection = 0
    else:
      pred_area = np.count_nonzero(pred)
      intersection = np.count_nonzero(pred & gt)
    union = pred_area + gt_area - intersection

    sample = dict.fromkeys(_COUNT_FIELDS, 0)
    sample.update(samples=1, intersection=intersection, union=union)
    row = GRANULARITIES.index(granularity)
    if gt_area == 0:
      sample["true_negatives"] = int(pred_area == 0)
    else:
      iou = intersection / union
      sample.update(target_samples=1, true_positives=int(pred_area > 0))
      sample.update({key: int(iou >= t) for key, t in zip(_PR_KEYS, PR_THRESHOLDS)})
      self._iou_sums[row] += iou
    self._counts[row] += np.array([sample[f] for f in _COUNT_FIELDS], np.int64)

  def result(self) -> dict[str, float]:
    """Overall metrics (keys `mIoU`, `cIoU`, `gIoU`, `N-acc`, `T-acc`, `Pr@X`, `count`) and the
    same keys prefixed `"<granularity>/"` for every granularity with at least one sample."""
    out = _metrics(self._counts.sum(axis=0), float(self._iou_sums.sum()))
    for row, granularity in enumerate(GRANULARITIES):
      if self._counts[row, _SAMPLES] > 0:
        metrics = _metrics(self._counts[row], float(self._iou_sums[row]))
        out.update({f"{granularity}/{key}": value for key, value in metrics.items()})
    return out

  def merge(self, other: "RESMetrics") -> None:
    """Adds the samples accumulated by `other` (e.g. another host's) to this accumulator."""
    if not isinstance(other, RESMetrics):
      raise TypeError(f"other must be a RESMetrics, got {type(other).__name__}")
    self._counts += other._counts
    self._iou_sums += other._iou_sums

  def state(self) -> dict[str, np.number]:
    """The accumulated sums as a flat dict `"<granularity>/<field>"` -> np.int64 / np.float64.

    Every granularity is present (zeros when unseen), so every host's state has the same keys:
    gather them, sum each key over hosts, and pass the sums to `from_state`. (JAX collectives
    turn int64 into int32 unless `jax_enable_x64` is set; gather as NumPy or enable x64.)
    """
    out = {}
    for row, granularity in enumerate(GRANULARITIES):
      for col, field in enumerate(_COUNT_FIELDS):
        out[f"{granularity}/{field}"] = self._counts[row, col]
      out[f"{granularity}/{_IOU_SUM_FIELD}"] = self._iou_sums[row]
    return out

  @classmethod
  def from_state(cls, state: Mapping[str, float]) -> "RESMetrics":
    """The accumulator whose `state()` is `state` (scalars; integral values for the counts)."""
    expected = {f"{g}/{f}" for g in GRANULARITIES for f in (*_COUNT_FIELDS, _IOU_SUM_FIELD)}
    if set(state) != expected:
      raise ValueError(
          f"state keys differ from RESMetrics.state(): missing {sorted(expected - set(state))}, "
          f"unexpected {sorted(set(state) - expected)}")
    metrics = cls()
    for row, granularity in enumerate(GRANULARITIES):
      for col, field in enumerate(_COUNT_FIELDS):
        metrics._counts[row, col] = _scalar(state, f"{granularity}/{field}", integral=True)
      metrics._iou_sums[row] = _scalar(state, f"{granularity}/{_IOU_SUM_FIELD}", integral=False)
    return metrics
