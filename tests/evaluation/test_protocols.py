"""RESMetrics under `rela` and `classic` against straight transcriptions of the reference
evaluators (ReLA's `refer_evaluation.py`, LAVT's `test.py`), and scoring on a square."""

import math

import numpy as np
import pytest

from unires_jax.data.schema import GRANULARITIES
from unires_jax.evaluation import evaluator
from unires_jax.evaluation.metrics import PROTOCOLS, RESMetrics


def _rela(samples):
  """ReLA's `ReferEvaluator.evaluate` (github.com/henghuiding/ReLA,
  gres_model/evaluation/refer_evaluation.py at 884ef17), one source, results / 100.

  `samples`: (pred_mask, gt_mask, granularity, pred_nt); ReLA's `gt_nt` is the dataset's `empty`
  flag, which on gRefCOCO is "the merged mask has no pixel"."""
  pr_thres = [.7, .8, .9]
  accum_I = accum_U = accum_IoU = 0
  pr_count = {thres: 0 for thres in pr_thres}
  total_count = not_empty_count = empty_count = 0
  nt = {"TP": 0, "TN": 0, "FP": 0, "FN": 0}
  for pred_mask, gt_mask, _, pred_nt in samples:
    gt_nt = not gt_mask.any()
    I = np.sum(np.logical_and(pred_mask, gt_mask))
    U = np.sum(np.logical_or(pred_mask, gt_mask))
    if gt_nt:
      empty_count += 1
      if pred_nt:
        nt["TP"] += 1
        accum_IoU += 1
        accum_I += 0
        accum_U += 0
      else:
        nt["FN"] += 1
        accum_IoU += 0
        accum_I += 0
        accum_U += int(U)
    else:
      if pred_nt:
        nt["FP"] += 1
        I = 0
      else:
        nt["TN"] += 1
      this_iou = float(0) if U == 0 else float(I) / float(U)
      accum_IoU += this_iou
      accum_I += I
      accum_U += U
      not_empty_count += 1
      for thres in pr_thres:
        if this_iou >= thres:
          pr_count[thres] += 1
    total_count += 1
  res = {"gIoU": 100. * (accum_IoU / total_count), "cIoU": accum_I * 100. / accum_U}
  if empty_count > 0:
    res["T_acc"] = nt["TN"] / (nt["TN"] + nt["FP"])
    res["N_acc"] = nt["TP"] / (nt["TP"] + nt["FN"])
  else:
    res["T_acc"] = res["N_acc"] = 0
  for thres in pr_thres:
    res["Pr@{0:1.1f}".format(thres)] = pr_count[thres] * 100. / not_empty_count
  return {"gIoU": res["gIoU"] / 100, "cIoU": res["cIoU"] / 100, "T-acc": res["T_acc"],
          "N-acc": res["N_acc"], **{f"Pr@{t}": res[f"Pr@{t}"] / 100 for t in pr_thres},
          "empty_count": empty_count}


def _lavt(samples):
  """LAVT's `evaluate` (github.com/yz93/LAVT-RIS, test.py), one expression per sample,
  results / 100: mIoU, overall IoU (cIoU), precision@X."""
  cum_I, cum_U = 0, 0
  eval_seg_iou_list = [.5, .6, .7, .8, .9]
  seg_correct = np.zeros(len(eval_seg_iou_list), dtype=np.int32)
  seg_total = 0
  mean_IoU = []
  for output_mask, target, _, _ in samples:
    I = np.sum(np.logical_and(output_mask, target))
    U = np.sum(np.logical_or(output_mask, target))
    this_iou = 0.0 if U == 0 else I * 1.0 / U
    mean_IoU.append(this_iou)
    cum_I += I
    cum_U += U
    for n_eval_iou in range(len(eval_seg_iou_list)):
      seg_correct[n_eval_iou] += (this_iou >= eval_seg_iou_list[n_eval_iou])
    seg_total += 1
  out = {"mIoU": float(np.mean(np.array(mean_IoU))), "cIoU": cum_I / cum_U}
  out.update({f"Pr@{t}": seg_correct[i] / seg_total for i, t in enumerate(eval_seg_iou_list)})
  return out


def _accumulate(protocol, samples):
  metrics = RESMetrics(protocol)
  for pred, gt, granularity, flag in samples:
    metrics.update(pred, gt, granularity, pred_no_target=flag)
  return metrics


def _mask(shape, *rects):
  mask = np.zeros(shape, np.bool_)
  for y0, y1, x0, x1 in rects:
    mask[y0:y1, x0:x1] = True
  return mask


_SHAPE = (6, 6)
_EMPTY = np.zeros(_SHAPE, np.bool_)
_GT = _mask(_SHAPE, (0, 3, 0, 3))  # 9 pixels
# Cases where the flag and the mask disagree, and their neighbours.
_DISAGREEING = [
    (_EMPTY, _GT, "object", False),  # empty mask but flag "target": a T-hit with IoU 0
    (_mask(_SHAPE, (0, 3, 0, 5)), _GT, "object", True),  # flag "no target", the raw mask spills
    #   6 pixels outside the target: I := 0 but U = 15 (the raw mask's union)
    (_mask(_SHAPE, (0, 3, 0, 3)), _GT, "part", True),  # flag "no target" on a perfect mask
    (_mask(_SHAPE, (4, 6, 4, 6)), _EMPTY, "none", True),  # empty G, flagged, raw mask ignored
    (_mask(_SHAPE, (4, 6, 4, 6)), _EMPTY, "none", False),  # empty G, not flagged: U += 4
    (_EMPTY, _EMPTY, "none", False),  # empty G, empty mask, not flagged: an N-miss in ReLA
    (_EMPTY, _EMPTY, "none", True),  # empty G, empty mask, flagged: an N-hit
    (_mask(_SHAPE, (0, 3, 0, 2)), _GT, "multi", False),  # IoU 6/9 (under 0.7)
    (_mask(_SHAPE, (0, 3, 0, 4)), _GT, "object", False),  # IoU 9/12 = 0.75
]


def _random_samples(n, seed):
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(n):
    shape = tuple(int(v) for v in rng.integers(1, 9, size=2))
    gt = rng.random(shape) < rng.choice([0.0, 0.3, 0.8])
    pred = rng.random(shape) < rng.choice([0.0, 0.4, 0.9])
    if rng.random() < 0.3:  # a prediction close to the target: IoUs near the thresholds
      pred = gt ^ (rng.random(shape) < 0.1)
    samples.append((pred, gt, str(rng.choice(GRANULARITIES)), bool(rng.random() < 0.4)))
  return samples


_RELA_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9", "count")


def _assert_rela(samples):
  """RESMetrics("rela") equals the transcription overall and on each granularity's samples
  (ReLA's sources are sets of samples as our granularities are)."""
  got = _accumulate("rela", samples).result()
  groups = sorted({s[2] for s in samples})
  assert set(got) == {*_RELA_KEYS, *(f"{g}/{k}" for g in groups for k in _RELA_KEYS)}
  _assert_rela_set(got, "", samples)
  for granularity in groups:
    subset = [s for s in samples if s[2] == granularity]
    if any(s[1].any() for s in subset):  # ReLA divides by the targeted samples' count
      _assert_rela_set(got, f"{granularity}/", subset)


def _assert_rela_set(got, prefix, samples):
  want = _rela(samples)
  assert got[prefix + "count"] == len(samples)
  for key in ("gIoU", "cIoU", "Pr@0.7", "Pr@0.8", "Pr@0.9"):
    assert got[prefix + key] == pytest.approx(want[key], rel=1e-12, abs=0), prefix + key
  if want["empty_count"]:
    for key in ("N-acc", "T-acc"):
      assert got[prefix + key] == pytest.approx(want[key], rel=1e-12, abs=0), prefix + key
  else:  # ReLA says T_acc = N_acc = 0 without an empty sample (the documented deviation): here
    # N-acc is undefined, NaN, and T-acc the share of samples not flagged.
    assert math.isnan(got[prefix + "N-acc"]), prefix
    assert got[prefix + "T-acc"] == sum(not s[3] for s in samples) / len(samples), prefix


def test_rela_equals_relas_evaluator_where_flags_and_masks_disagree():
  _assert_rela(_DISAGREEING)
  got = _accumulate("rela", _DISAGREEING).result()
  # By hand: IoUs of the 5 targeted samples 0, 0, 0, 2/3, 3/4 plus 2 flagged empty samples' 1.
  assert got["gIoU"] == pytest.approx((2 / 3 + 3 / 4 + 2) / 9, rel=1e-12)
  # Σ I = 6 + 9; Σ U = 9 + 15 + 9 + 4 + 0 + 9 + 12 (the flagged spill keeps its union of 15).
  assert got["cIoU"] == pytest.approx(15 / 58, rel=1e-12)
  assert (got["N-acc"], got["T-acc"]) == (2 / 4, 3 / 5)


@pytest.mark.parametrize("case", range(len(_DISAGREEING)))
def test_rela_equals_relas_evaluator_case_by_case_with_a_correct_sample(case):
  # A perfectly predicted targeted sample keeps every denominator non-zero.
  _assert_rela([_DISAGREEING[case], (_GT, _GT, "object", False)])


@pytest.mark.parametrize("seed", range(4))
def test_rela_equals_relas_evaluator_on_random_samples(seed):
  _assert_rela(_random_samples(80, seed))


def test_rela_differs_from_lisa_where_the_docstring_says():
  # Empty mask, flag "target", non-empty G: a T-hit in ReLA, a T-miss under lisa.
  sample = [(_EMPTY, _GT, "object", False)]
  assert _accumulate("rela", sample).result()["T-acc"] == 1.0
  assert _accumulate("lisa", sample).result()["T-acc"] == 0.0
  # Flag "no target" with a raw mask that spills: ReLA keeps its union, lisa uses |G|.
  sample = [(_mask(_SHAPE, (0, 3, 0, 5)), _GT, "object", True), (_GT, _GT, "object", False)]
  assert _accumulate("rela", sample).result()["cIoU"] == 9 / 24
  assert _accumulate("lisa", sample).result()["cIoU"] == 9 / 18
  # Empty mask, no flag, empty G: an N-miss in ReLA, an N-hit under lisa.
  sample = [(_EMPTY, _EMPTY, "none", False)]
  assert _accumulate("rela", sample).result()["N-acc"] == 0.0
  assert _accumulate("lisa", sample).result()["N-acc"] == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_classic_equals_lavts_evaluator_and_ignores_the_flag(seed):
  samples = _random_samples(60, seed)
  got = _accumulate("classic", samples).result()
  want = _lavt(samples)
  overall = {k for k in got if "/" not in k}
  assert overall == {"mIoU", "cIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "count"}
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-12, abs=0), key
  flipped = [(p, g, gran, not flag) for p, g, gran, flag in samples]
  assert _accumulate("classic", flipped).result() == pytest.approx(got, nan_ok=True)


def test_classic_never_reports_n_acc_t_acc_or_giou():
  result = _accumulate("classic", _DISAGREEING).result()
  assert not [k for k in result if k.split("/")[-1] in ("N-acc", "T-acc", "gIoU")]
  # Every expression keeps its mask: the flagged perfect "part" mask scores IoU 1.
  assert result["part/mIoU"] == 1.0
  # RefCOCOm's "Part" and "Obj & Part" columns.
  assert {"part/mIoU", "mIoU", "object/mIoU"} <= set(result)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_merge_and_state_keep_every_protocol(protocol):
  samples = _random_samples(50, seed=7)
  single = _accumulate(protocol, samples)
  merged = _accumulate(protocol, samples[:20])
  merged.merge(_accumulate(protocol, samples[20:]))
  assert merged.result() == pytest.approx(single.result(), rel=1e-12, nan_ok=True)
  # Multi-host: states summed key by key, restored under the same protocol.
  first, second = _accumulate(protocol, samples[:31]), _accumulate(protocol, samples[31:])
  summed = {k: first.state()[k] + second.state()[k] for k in first.state()}
  restored = RESMetrics.from_state(summed, protocol)
  assert restored.protocol == protocol
  assert restored.result() == pytest.approx(single.result(), rel=1e-12, nan_ok=True)
  assert set(restored.result()) == set(single.result())


def test_protocol_errors():
  with pytest.raises(ValueError, match=r"protocol must be one of \('classic', 'rela', 'lisa'\)"):
    RESMetrics("ReLA")
  with pytest.raises(ValueError, match="cannot merge protocol 'lisa' into 'rela'"):
    RESMetrics("rela").merge(RESMetrics("lisa"))


def test_square_scoring_of_a_known_case():
  """A 4 x 8 image (scale 1 into an 8 x 8 letterboxed view): the target is its columns 0-2, the
  prediction columns 0-3; at the original size IoU = 12 / 16. On a 4 x 4 square the ground
  truth keeps, by nearest neighbour, source columns 1, 3, 5, 7: only column 0 (4 pixels); the
  prediction, shrunk 2:1 bilinearly from logits +10 / -10, covers columns 0-1 (8 pixels):
  IoU 1/2."""
  logits = np.full((8, 8), -10.0, np.float32)
  logits[:4, :4] = 10.0
  logits[4:] = 10.0  # letterbox padding below the image: cropped away, never scored
  gt = np.zeros((4, 8), np.bool_)
  gt[:, :3] = True

  def iou(resolution):
    truth = gt if resolution == 0 else evaluator.resize_mask(gt, resolution)
    pred = evaluator.resize_prediction(logits, (4, 8), 1.0, truth.shape)
    metrics = RESMetrics("classic")
    metrics.update(pred, truth)
    return metrics.result()["mIoU"], pred, truth

  assert iou(0)[0] == 12 / 16
  value, pred, truth = iou(4)
  assert truth.shape == pred.shape == (4, 4)
  np.testing.assert_array_equal(truth, np.tile([True, False, False, False], (4, 1)))
  np.testing.assert_array_equal(pred, np.tile([True, True, False, False], (4, 1)))
  assert value == 0.5


def test_square_scoring_undoes_the_letterbox_scale():
  """A 20 x 10 image seen at scale 0.4 (an 8 x 4 region of the 8 x 8 view); scored on 10 x 10.
  The prediction covers the image's top half, as does the target: IoU 1."""
  logits = np.full((8, 8), -10.0, np.float32)
  logits[:4, :4] = 10.0
  gt = np.zeros((20, 10), np.bool_)
  gt[:10] = True
  truth = evaluator.resize_mask(gt, 10)
  pred = evaluator.resize_prediction(logits, (20, 10), 0.4, truth.shape)
  np.testing.assert_array_equal(truth[:5], True)
  np.testing.assert_array_equal(truth[5:], False)
  np.testing.assert_array_equal(pred, truth)
