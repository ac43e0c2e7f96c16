"""RESMetrics on hand-computed cases: classic RES (mIoU, cIoU, Pr@X), gRefCOCO no-target rules."""

import math

import numpy as np
import pytest

from unires_jax.data.schema import GRANULARITIES
from unires_jax.evaluation.metrics import PR_THRESHOLDS, RESMetrics

_METRIC_KEYS = ("mIoU", "cIoU", "gIoU", "N-acc", "T-acc", *(f"Pr@{t}" for t in PR_THRESHOLDS))
NAN = float("nan")


def _mask(shape, *rects):
  """Boolean `shape` mask, True on each (y0, y1, x0, x1) rectangle."""
  mask = np.zeros(shape, np.bool_)
  for y0, y1, x0, x1 in rects:
    mask[y0:y1, x0:x1] = True
  return mask


def _assert_metrics(result, expected):
  """Every key of `expected` equals `result`'s exactly (NaN matches NaN)."""
  for key, value in expected.items():
    if isinstance(value, float) and math.isnan(value):
      assert math.isnan(result[key]), (key, result[key])
    else:
      assert result[key] == value, (key, result[key], value)


def _single(pred, gt, **kwargs):
  metrics = RESMetrics()
  metrics.update(pred, gt, **kwargs)
  return metrics.result()


def test_partial_overlap():
  gt = _mask((4, 4), (0, 2, 0, 2))  # 4 pixels.
  pred = _mask((4, 4), (0, 2, 0, 4))  # 8 pixels, containing gt: I = 4, U = 8.
  _assert_metrics(_single(pred, gt), {
      "mIoU": 0.5, "cIoU": 0.5, "gIoU": 0.5, "N-acc": NAN, "T-acc": 1.0,
      "Pr@0.5": 1.0, "Pr@0.6": 0.0, "Pr@0.7": 0.0, "Pr@0.8": 0.0, "Pr@0.9": 0.0, "count": 1})


def test_partial_overlap_neither_contains_the_other():
  gt = _mask((3, 3), (0, 2, 0, 2))  # 4 pixels.
  pred = _mask((3, 3), (1, 3, 1, 3))  # 4 pixels; I = 1, U = 7.
  _assert_metrics(_single(pred, gt), {"mIoU": 1 / 7, "cIoU": 1 / 7, "gIoU": 1 / 7})


@pytest.mark.parametrize("hits", [49, 50, 60, 70, 80, 90, 99])
def test_pr_counts_an_iou_equal_to_the_threshold(hits):
  # LAVT and ReLA count `this_iou >= thres`: IoU = hits / 100 exactly.
  gt = _mask((1, 100), (0, 1, 0, 100))
  pred = _mask((1, 100), (0, 1, 0, hits))
  result = _single(pred, gt)
  assert result["mIoU"] == hits / 100
  for t in PR_THRESHOLDS:
    assert result[f"Pr@{t}"] == (1.0 if hits / 100 >= t else 0.0), t


def test_empty_prediction():
  gt = _mask((4, 4), (1, 3, 1, 3))
  _assert_metrics(_single(np.zeros((4, 4), np.bool_), gt), {
      "mIoU": 0.0, "cIoU": 0.0, "gIoU": 0.0, "N-acc": NAN, "T-acc": 0.0,
      **{f"Pr@{t}": 0.0 for t in PR_THRESHOLDS}, "count": 1})


def test_empty_ground_truth():
  pred = _mask((4, 4), (0, 1, 0, 3))  # 3 false-positive pixels: I = 0, U = 3.
  _assert_metrics(_single(pred, np.zeros((4, 4), np.bool_), granularity="none"), {
      "mIoU": NAN, "cIoU": 0.0, "gIoU": 0.0, "N-acc": 0.0, "T-acc": NAN,
      **{f"Pr@{t}": NAN for t in PR_THRESHOLDS}, "count": 1})


@pytest.mark.parametrize("pred_no_target", [None, False, True])
def test_both_empty(pred_no_target):
  empty = np.zeros((4, 4), np.bool_)
  _assert_metrics(_single(empty, empty, granularity="none", pred_no_target=pred_no_target), {
      "mIoU": NAN, "cIoU": NAN, "gIoU": 1.0, "N-acc": 1.0, "T-acc": NAN, "count": 1})


def test_all_true():
  full = np.ones((3, 5), np.bool_)
  _assert_metrics(_single(full, full), {
      "mIoU": 1.0, "cIoU": 1.0, "gIoU": 1.0, "N-acc": NAN, "T-acc": 1.0,
      **{f"Pr@{t}": 1.0 for t in PR_THRESHOLDS}})


_GT = _mask((4, 4), (0, 2, 0, 2))  # 4 pixels.
_EMPTY = np.zeros((4, 4), np.bool_)
_FIVE = _mask((4, 4), (3, 4, 0, 4), (2, 3, 3, 4))  # 5 pixels outside _GT.
_THREE = _mask((4, 4), (3, 4, 0, 3))  # 3 pixels outside _GT.


@pytest.mark.parametrize("pred, gt, pred_no_target, expected", [
    # No-target expression, model says no target (its mask is ignored): TN, IoU 1, U += 0.
    (_FIVE, _EMPTY, True, {"gIoU": 1.0, "N-acc": 1.0, "cIoU": NAN, "mIoU": NAN}),
    # No-target expression, model segments 3 pixels: FP, IoU 0, its pixels join the union.
    (_THREE, _EMPTY, False, {"gIoU": 0.0, "N-acc": 0.0, "cIoU": 0.0, "mIoU": NAN}),
    # Targeted expression, model says no target although its mask is right: FN, I = 0, U = |G|.
    (_GT, _GT, True, {"gIoU": 0.0, "T-acc": 0.0, "cIoU": 0.0, "mIoU": 0.0, "Pr@0.5": 0.0}),
    # Targeted expression, right mask, no no-target claim: TP, IoU 1.
    (_GT, _GT, False, {"gIoU": 1.0, "T-acc": 1.0, "cIoU": 1.0, "mIoU": 1.0, "Pr@0.9": 1.0}),
])
def test_grefcoco_no_target_cases(pred, gt, pred_no_target, expected):
  _assert_metrics(_single(pred, gt, pred_no_target=pred_no_target), expected)


def test_grefcoco_no_target_cases_together():
  metrics = RESMetrics()
  metrics.update(_FIVE, _EMPTY, "none", pred_no_target=True)  # TN: I 0, U 0, IoU 1.
  metrics.update(_THREE, _EMPTY, "none", pred_no_target=False)  # FP: I 0, U 3, IoU 0.
  metrics.update(_GT, _GT, "object", pred_no_target=True)  # FN: I 0, U 4, IoU 0.
  metrics.update(_GT, _GT, "object", pred_no_target=False)  # TP: I 4, U 4, IoU 1.
  _assert_metrics(metrics.result(), {
      "mIoU": 0.5, "cIoU": 4 / 11, "gIoU": 0.5, "N-acc": 0.5, "T-acc": 0.5,
      **{f"Pr@{t}": 0.5 for t in PR_THRESHOLDS}, "count": 4})


def test_target_sample_with_empty_mask_and_no_claim_is_a_miss():
  # The effective prediction decides, not the flag: pred_no_target=False with nothing segmented
  # is a false negative, as is pred_no_target=True.
  _assert_metrics(_single(_EMPTY, _GT, pred_no_target=False), {"T-acc": 0.0, "gIoU": 0.0})


def test_per_granularity_keys():
  metrics = RESMetrics()
  metrics.update(_GT, _GT, "object")  # IoU 1.
  metrics.update(_mask((4, 4), (0, 2, 0, 4)), _GT, "part")  # IoU 4 / 8.
  metrics.update(_EMPTY, _EMPTY, "none")  # TN.
  result = metrics.result()
  expected_keys = {*_METRIC_KEYS, "count"}
  for granularity in ("object", "part", "none"):
    expected_keys |= {f"{granularity}/{key}" for key in (*_METRIC_KEYS, "count")}
  assert set(result) == expected_keys  # No "multi/..." key: no sample of that granularity.
  _assert_metrics(result, {
      "count": 3, "mIoU": 0.75, "gIoU": 2.5 / 3, "cIoU": 8 / 12, "N-acc": 1.0, "T-acc": 1.0,
      "Pr@0.5": 1.0, "Pr@0.6": 0.5,
      "object/count": 1, "object/mIoU": 1.0, "object/N-acc": NAN,
      "part/count": 1, "part/mIoU": 0.5, "part/cIoU": 0.5, "part/Pr@0.5": 1.0, "part/Pr@0.6": 0.0,
      "none/count": 1, "none/gIoU": 1.0, "none/N-acc": 1.0, "none/mIoU": NAN, "none/cIoU": NAN})


def test_no_sample_gives_nan():
  result = RESMetrics().result()
  assert set(result) == {*_METRIC_KEYS, "count"}
  assert result["count"] == 0
  assert all(math.isnan(result[key]) for key in _METRIC_KEYS)


def _random_samples(n, seed=0):
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(n):
    shape = tuple(rng.integers(1, 9, size=2))
    gt = rng.random(shape) < rng.choice([0.0, 0.3, 0.8])
    pred = rng.random(shape) < rng.choice([0.0, 0.4, 0.9])
    samples.append((pred, gt, str(rng.choice(GRANULARITIES)), rng.choice([None, False, True])))
  return samples


def _accumulate(samples):
  metrics = RESMetrics()
  for pred, gt, granularity, pred_no_target in samples:
    metrics.update(pred, gt, granularity, pred_no_target)
  return metrics


def test_merge_equals_a_single_accumulator():
  samples = _random_samples(60)
  merged = _accumulate(samples[:25])
  merged.merge(_accumulate(samples[25:26]))
  merged.merge(_accumulate(samples[26:]))
  single = _accumulate(samples)
  # Integer sums are exact; the float64 IoU sums differ only by the order of the additions.
  assert merged.result() == pytest.approx(single.result(), rel=1e-12, nan_ok=True)
  assert set(merged.result()) == set(single.result())


def test_merge_rejects_other_types():
  with pytest.raises(TypeError, match="RESMetrics"):
    RESMetrics().merge({"object/samples": 1})


def test_state_round_trip():
  metrics = _accumulate(_random_samples(30, seed=1))
  state = metrics.state()
  assert all(isinstance(v, (np.int64, np.float64)) for v in state.values())
  restored = RESMetrics.from_state(state)
  assert restored.state() == state
  assert restored.result() == pytest.approx(metrics.result(), rel=0, abs=0, nan_ok=True)


def test_state_keys_do_not_depend_on_the_samples_and_summed_states_merge():
  first = _accumulate(_random_samples(10, seed=2))
  second = RESMetrics()
  second.update(_GT, _GT, "multi")
  assert set(first.state()) == set(second.state()) == set(RESMetrics().state())
  # What a multi-host evaluation does: gather every host's state and sum it key by key.
  summed = {key: first.state()[key] + second.state()[key] for key in first.state()}
  first.merge(second)
  assert RESMetrics.from_state(summed).state() == first.state()


def test_state_keeps_large_counts_exact():
  state = RESMetrics().state()
  state["object/samples"] = state["object/target_samples"] = 1
  state["object/intersection"] = 2**53 + 1  # Not representable in float64.
  state["object/union"] = 2**53 + 3
  restored = RESMetrics.from_state(state)
  assert restored.state()["object/intersection"] == 2**53 + 1
  assert restored.result()["cIoU"] == (2**53 + 1) / (2**53 + 3)


def test_from_state_errors():
  state = RESMetrics().state()
  with pytest.raises(ValueError, match="missing"):
    RESMetrics.from_state({k: v for k, v in state.items() if k != "part/union"})
  with pytest.raises(ValueError, match="unexpected"):
    RESMetrics.from_state({**state, "extra": 0})
  with pytest.raises(ValueError, match="object/union"):
    RESMetrics.from_state({**state, "object/union": 2.5})
  with pytest.raises(ValueError, match="object/iou_sum"):
    RESMetrics.from_state({**state, "object/iou_sum": np.zeros(2)})


@pytest.mark.parametrize("pred, gt, kwargs, message", [
    (np.zeros((2, 2, 1), np.bool_), np.zeros((2, 2), np.bool_), {}, "pred_mask"),
    (np.zeros((2, 2), np.bool_), np.zeros(4, np.bool_), {}, "gt_mask"),
    (np.zeros((2, 2), np.bool_), np.zeros((2, 3), np.bool_), {}, "pred_mask shape"),
    (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.bool_), {}, "pred_mask must be boolean"),
    (np.zeros((2, 2), np.bool_), np.zeros((2, 2), np.uint8), {}, "gt_mask must be boolean"),
    (np.zeros((2, 2), np.bool_), np.zeros((2, 2), np.bool_), {"granularity": "objects"},
     "granularity"),
    (np.zeros((2, 2), np.bool_), np.zeros((2, 2), np.bool_), {"pred_no_target": 0.5},
     "pred_no_target"),
])
def test_update_errors(pred, gt, kwargs, message):
  metrics = RESMetrics()
  with pytest.raises(ValueError, match=message):
    metrics.update(pred, gt, **kwargs)
  assert metrics.result()["count"] == 0  # A rejected sample adds nothing.
