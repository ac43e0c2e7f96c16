"""Referring expression segmentation metrics under three protocols: `classic` (RefCOCO/+/g and
RefCOCOm, as LAVT and CRIS score them), `rela` (gRefCOCO, as ReLA scores it) and `lisa`.

`RESMetrics(protocol)` accumulates, one expression at a time, the predicted mask `P` (the mask
the model segments, whatever its no-target flag says), the model's no-target flag, and the ground
truth `G` (boolean `[H, W]` masks at the scoring resolution, `evaluator` makes them). A sample is
"empty" when G has no pixel (a gRefCOCO no-target expression). With I = |P ∩ G|, U = |P ∪ G|:

classic  (LAVT github.com/yz93/LAVT-RIS `test.py`; CRIS github.com/DerrickWang005/CRIS.pytorch
         `engine/engine.py`.) Every expression gets its mask; the no-target flag is not consulted.
  IoU   = I / U, and 0 when U = 0      (LAVT: `if U == 0: this_iou = 0.0 else: this_iou = I*1.0/U`)
  mIoU  = mean IoU over ALL samples    (LAVT: `mean_IoU.append(this_iou)`,
                                       `mIoU = np.mean(mean_IoU)`)
  cIoU  = Σ I / Σ U over all samples, also called oIoU
                                       (LAVT: `cum_I += I`, `cum_U += U`, `cum_I * 100. / cum_U`)
  Pr@X  = fraction of all samples with IoU >= X, X in 0.5 .. 0.9
          (LAVT: `seg_correct[n_eval_iou] += (this_iou >= eval_seg_iou)` over
          `eval_seg_iou_list = [.5, .6, .7, .8, .9]`, divided by `seg_total`; CRIS's `inference`
          counts `iou > thres` of `I / (U + 1e-6)` instead; LAVT's rule is kept.)
  Reported: mIoU, cIoU, Pr@0.5 .. Pr@0.9, count; never gIoU, N-acc or T-acc. On RefCOCO/+/g and
  RefCOCOm no G is empty; an empty G scores IoU 0 whatever P is, as in LAVT. RefCOCOm's
  "Part" is `part/mIoU`, its "Obj & Part" the overall `mIoU`.

rela     (ReLA github.com/henghuiding/ReLA `gres_model/evaluation/refer_evaluation.py`, commit
         884ef17 "fix eval metrics".) The flag alone decides "no target"; P is the raw mask.
  empty G,     flagged:     N-hit;  I += 0, U += 0, IoU := 1
                                    (`nt["TP"] += 1; accum_IoU += 1; accum_U += 0`)
  empty G,     not flagged: N-miss; I += 0, U += |P|, IoU := 0
                                    (`nt["FN"] += 1; accum_IoU += 0; accum_U += int(U)`)
  non-empty G, flagged:     T-miss; I := 0, U += |P ∪ G| of the raw mask, IoU = 0
                                    (`nt["FP"] += 1; I = 0`, then `accum_U[src] += U`)
  non-empty G, not flagged: T-hit;  I, U, IoU = I / U (an empty P is a T-hit with IoU 0)
                                    (`nt["TN"] += 1`; `this_iou = float(I) / float(U)`)
  gIoU  = Σ IoU / number of samples    (`res['gIoU'] = 100. * (accum_IoU / total_count)`)
  cIoU  = Σ I / Σ U                    (`res['cIoU'] = accum_I * 100. / accum_U`)
  N-acc = N-hits / empty samples       (`N_acc = TP / (TP + FN)`: ReLA's "positive" is "no target")
  T-acc = T-hits / non-empty samples   (`T_acc = TN / (TN + FP)`)
  Pr@X  = fraction of the non-empty samples with IoU >= X, X in 0.7, 0.8, 0.9
                                       (`pr_thres = [.7, .8, .9]`, `if this_iou >= thres`,
                                       `pr_count * 100. / not_empty_count`)
  Reported: gIoU, cIoU, N-acc, T-acc, Pr@0.7, Pr@0.8, Pr@0.9, count. Deviations: ReLA reads
  "empty" from the dataset's flag, here from G having no pixel (the same on gRefCOCO, whose
  no-target expressions have empty merged masks); ReLA reports T_acc = N_acc = 0 for a set
  without an empty sample, here N-acc is NaN and T-acc its own ratio; ReLA's sets are its data
  sources, here the whole split and each granularity.

lisa     (How LISA-style models are scored: the project's rule before the other two.) The flag
  empties the effective prediction (P := {} when flagged), and an empty effective prediction
  counts as "no target".
  IoU   = I / U of the effective P     when G is non-empty (U >= |G| > 0)
  mIoU  = mean IoU over the samples with non-empty G
  cIoU  = Σ I / Σ U over ALL samples (an empty-G sample adds its false-positive pixels to U)
  gIoU  = mean over ALL samples of IoU (non-empty G) or, for an empty G, 1 if P is empty else 0
  N-acc = empty-G samples with P empty / empty-G samples
  T-acc = non-empty-G samples with P non-empty / non-empty-G samples
  Pr@X  = fraction of the samples with non-empty G whose IoU >= X, X in 0.5 .. 0.9
  Reported: mIoU, cIoU, gIoU, N-acc, T-acc, Pr@0.5 .. Pr@0.9, count. Against ReLA: an empty P
  with no flag on an empty G is a hit with IoU 1 here (ReLA: a miss, IoU 0), on a non-empty G a
  T-miss here (ReLA: a T-hit, IoU 0 in both); a flag on a non-empty G leaves U = |G| here (ReLA:
  the raw mask's union). Against LAVT: empty-G samples do not count in mIoU.

All protocols: a metric whose denominator is zero is NaN. Values are fractions in [0, 1]; LAVT
and ReLA print 100 times these. Every metric is reported overall and, prefixed
`"<granularity>/"`, for every granularity of `unires_jax.data.schema.GRANULARITIES` with a sample.

Sums are int64 (pixel and sample counts, exact) and float64 (the sum of per-sample IoUs), kept
per granularity; the overall metrics use their totals. They have the same fields under every
protocol (`state`), so hosts sum them key by key.
"""

from collections.abc import Mapping

import numpy as np

from unires_jax.data.schema import GRANULARITIES

PROTOCOLS = ("classic", "rela", "lisa")
PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # accumulated under every protocol
RELA_PR_THRESHOLDS = (0.7, 0.8, 0.9)  # reported under `rela`

_PR_KEYS = tuple(f"Pr@{t}" for t in PR_THRESHOLDS)
# Integer sums kept per granularity: samples, samples with non-empty ground truth, Σ I, Σ U,
# empty-G samples judged "no target" (N-hits), non-empty-G samples judged "target" (T-hits), and
# the non-empty-G samples with IoU >= each threshold; the protocol decides what each sample adds.
_COUNT_FIELDS = (
    "samples", "target_samples", "intersection", "union", "true_negatives", "true_positives",
    *_PR_KEYS)
_SAMPLES = _COUNT_FIELDS.index("samples")
_IOU_SUM_FIELD = "iou_sum"
# What `result` reports under each protocol, in the module doc's order.
_REPORTED = {
    "classic": ("mIoU", "cIoU", *_PR_KEYS),
    "rela": ("gIoU", "cIoU", "N-acc", "T-acc", *(f"Pr@{t}" for t in RELA_PR_THRESHOLDS)),
    "lisa": ("mIoU", "cIoU", "gIoU", "N-acc", "T-acc", *_PR_KEYS),
}


def check_protocol(protocol: str) -> str:
  """`protocol`, or a ValueError listing `PROTOCOLS`."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  return protocol


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


def _metrics(protocol: str, counts: np.ndarray, iou_sum: float) -> dict[str, float]:
  """The metrics of one set of samples from its `_COUNT_FIELDS` sums `[n_fields]` and Σ IoU."""
  c = dict(zip(_COUNT_FIELDS, counts.tolist()))  # Python ints: exact true division.
  empty_samples = c["samples"] - c["target_samples"]
  # classic averages IoU and Pr@X over every sample (an empty G scores IoU 0), the others over
  # the samples with non-empty G.
  per_sample = c["samples"] if protocol == "classic" else c["target_samples"]
  out = {
      "mIoU": _ratio(iou_sum, per_sample),
      "cIoU": _ratio(c["intersection"], c["union"]),
      "gIoU": _ratio(iou_sum + c["true_negatives"], c["samples"]),
      "N-acc": _ratio(c["true_negatives"], empty_samples),
      "T-acc": _ratio(c["true_positives"], c["target_samples"]),
  }
  out.update({key: _ratio(c[key], per_sample) for key in _PR_KEYS})
  out = {key: out[key] for key in _REPORTED[protocol]}
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
  """Accumulates RES / GRES metrics over samples under one protocol (`PROTOCOLS`); see the
  module docstring for the formulas."""

  def __init__(self, protocol: str = "lisa"):
    self.protocol = check_protocol(protocol)
    self._counts = np.zeros((len(GRANULARITIES), len(_COUNT_FIELDS)), np.int64)
    self._iou_sums = np.zeros(len(GRANULARITIES), np.float64)

  def update(self, pred_mask, gt_mask, granularity: str = "object",
             pred_no_target: bool | None = None) -> None:
    """Adds one sample (one expression).

    Args:
      pred_mask: boolean `[H, W]` mask the model segments, at the scoring resolution.
      gt_mask: boolean `[H, W]` ground truth, empty for a no-target expression.
      granularity: one of `GRANULARITIES` ("object", "part", "multi", "none").
      pred_no_target: the model's no-target flag; None (a model or baseline that makes no such
        claim) counts as False. `lisa`: True empties the effective prediction; `rela`: True is
        the "no target" verdict, `pred_mask` still counts in the union of a targeted sample;
        `classic`: not consulted.
    """
    pred = _check_mask("pred_mask", pred_mask)
    gt = _check_mask("gt_mask", gt_mask)
    if pred.shape != gt.shape:
      raise ValueError(
          f"pred_mask shape {pred.shape} differs from gt_mask shape {gt.shape}; resize both to "
          "the scoring resolution")
    if granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if pred_no_target not in (None, True, False):
      raise ValueError(f"pred_no_target must be None or a bool, got {pred_no_target!r}")

    gt_area = np.count_nonzero(gt)
    pred_area = np.count_nonzero(pred)
    intersection = np.count_nonzero(pred & gt)
    union = pred_area + gt_area - intersection
    flagged = bool(pred_no_target)
    if self.protocol == "rela":
      says_none = flagged
      if flagged:  # ReLA: I = 0; U = 0 on an empty G, the raw mask's union otherwise.
        intersection, union = 0, (0 if gt_area == 0 else union)
    else:
      if self.protocol == "lisa" and flagged:  # the effective prediction is empty
        pred_area, intersection, union = 0, 0, gt_area
      says_none = pred_area == 0

    sample = dict.fromkeys(_COUNT_FIELDS, 0)
    sample.update(samples=1, intersection=intersection, union=union)
    row = GRANULARITIES.index(granularity)
    if gt_area == 0:
      sample["true_negatives"] = int(says_none)
    else:
      iou = intersection / union
      sample.update(target_samples=1, true_positives=int(not says_none))
      sample.update({key: int(iou >= t) for key, t in zip(_PR_KEYS, PR_THRESHOLDS)})
      self._iou_sums[row] += iou
    self._counts[row] += np.array([sample[f] for f in _COUNT_FIELDS], np.int64)

  def result(self) -> dict[str, float]:
    """Overall metrics (the protocol's keys of the module doc, and `count`) and the same keys
    prefixed `"<granularity>/"` for every granularity with at least one sample."""
    out = _metrics(self.protocol, self._counts.sum(axis=0), float(self._iou_sums.sum()))
    for row, granularity in enumerate(GRANULARITIES):
      if self._counts[row, _SAMPLES] > 0:
        metrics = _metrics(self.protocol, self._counts[row], float(self._iou_sums[row]))
        out.update({f"{granularity}/{key}": value for key, value in metrics.items()})
    return out

  def merge(self, other: "RESMetrics") -> None:
    """Adds the samples accumulated by `other` (e.g. another host's) to this accumulator."""
    if not isinstance(other, RESMetrics):
      raise TypeError(f"other must be a RESMetrics, got {type(other).__name__}")
    if other.protocol != self.protocol:
      raise ValueError(f"cannot merge protocol {other.protocol!r} into {self.protocol!r}")
    self._counts += other._counts
    self._iou_sums += other._iou_sums

  def state(self) -> dict[str, np.number]:
    """The accumulated sums as a flat dict `"<granularity>/<field>"` -> np.int64 / np.float64.

    Every granularity is present (zeros when unseen), so every host's state has the same keys:
    gather them, sum each key over hosts, and pass the sums to `from_state` with the same
    protocol (the fields are the same under every protocol, not their values). (JAX collectives
    turn int64 into int32 unless `jax_enable_x64` is set; gather as NumPy or enable x64.)
    """
    out = {}
    for row, granularity in enumerate(GRANULARITIES):
      for col, field in enumerate(_COUNT_FIELDS):
        out[f"{granularity}/{field}"] = self._counts[row, col]
      out[f"{granularity}/{_IOU_SUM_FIELD}"] = self._iou_sums[row]
    return out

  @classmethod
  def from_state(cls, state: Mapping[str, float], protocol: str = "lisa") -> "RESMetrics":
    """The `protocol` accumulator whose `state()` is `state` (scalars; integral values for the
    counts)."""
    expected = {f"{g}/{f}" for g in GRANULARITIES for f in (*_COUNT_FIELDS, _IOU_SUM_FIELD)}
    if set(state) != expected:
      raise ValueError(
          f"state keys differ from RESMetrics.state(): missing {sorted(expected - set(state))}, "
          f"unexpected {sorted(set(state) - expected)}")
    metrics = cls(protocol)
    for row, granularity in enumerate(GRANULARITIES):
      for col, field in enumerate(_COUNT_FIELDS):
        metrics._counts[row, col] = _scalar(state, f"{granularity}/{field}", integral=True)
      metrics._iou_sums[row] = _scalar(state, f"{granularity}/{_IOU_SUM_FIELD}", integral=False)
    return metrics
