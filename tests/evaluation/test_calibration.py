"""The no-target calibration: the threshold with the best balanced accuracy, stored beside a
checkpoint and read back as the config's threshold (the trained run: tests/serving)."""

import json
import os

import numpy as np
import pytest

from unires_jax import checkpoint, config_lib
from unires_jax.evaluation import calibration


def _balanced(logits, no_target, t):
  """(N-acc + T-acc) / 2 of "no target" iff logit > t, counted one expression at a time."""
  n_right = sum(1 for x, n in zip(logits, no_target) if n and x > t)
  t_right = sum(1 for x, n in zip(logits, no_target) if not n and x <= t)
  return (n_right / sum(no_target) + t_right / (len(no_target) - sum(no_target))) / 2


def test_the_threshold_has_the_best_balanced_accuracy():
  rng = np.random.default_rng(0)
  no_target = rng.random(300) < 0.15
  logits = rng.normal(np.where(no_target, 1.0, -1.5), 1.0).round(1)  # ties in the scores
  t = calibration.best_threshold(logits, no_target)
  grid = np.concatenate([np.unique(logits) - 0.05, np.unique(logits) + 0.05])
  best = max(_balanced(logits, no_target, g) for g in grid)
  assert _balanced(logits, no_target, t) == pytest.approx(best, abs=1e-12)
  assert t not in set(logits)  # halfway between two scores, not on one
  accs = calibration.accuracies(logits, no_target, t)
  assert (accs["N-acc"] + accs["T-acc"]) / 2 == pytest.approx(best, abs=1e-12)


def test_among_equal_thresholds_the_one_nearest_zero():
  # Perfectly separated: every t in (-1, 2) is right on all; the midpoint nearest 0 of the
  # candidates (-1 + 2) / 2 = 0.5 is the only one there.
  assert calibration.best_threshold([-3.0, -1.0, 2.0, 4.0], [False, False, True, True]) == 0.5
  # Separated at -2.5 or 3.0 equally well (one error each way): -2.5 is nearer 0.
  logits = [-4.0, -1.0, 2.0, 5.0]
  assert calibration.best_threshold(logits, [False, True, False, True]) == pytest.approx(-2.5)


def test_both_kinds_of_expression_are_needed():
  with pytest.raises(calibration.CalibrationError, match="with and without a target; got 0 of 3"):
    calibration.best_threshold([0.1, 0.2, 0.3], [False, False, False])


def _run_dir(tmp_path, threshold: float = 0.5) -> str:
  """A training work directory as `checkpoint.locate` finds it (no parameters are read)."""
  config = config_lib.load_config("tiny")
  config.model.no_target_threshold = threshold
  config_lib.write_config_json(config, str(tmp_path))
  os.makedirs(tmp_path / "checkpoints" / "7" / checkpoint.STATE_DIR)
  return str(tmp_path)


def test_a_stored_calibration_is_the_checkpoints_threshold(tmp_path):
  run = _run_dir(tmp_path, threshold=0.5)
  where = checkpoint.locate(run)
  assert where.calibration() is None and where.config().model.no_target_threshold == 0.5
  path = calibration.save({"no_target_threshold": 0.3125, "split": "train[:300]"}, where)
  assert path == os.path.join(run, "checkpoints", "7", checkpoint.CALIBRATION_FILE)
  assert checkpoint.locate(run).config().model.no_target_threshold == 0.3125
  config = config_lib.load_config("tiny")
  assert calibration.applied(config, where.calibration()).model.no_target_threshold == 0.3125
  assert config.model.no_target_threshold == 0.5  # `applied` copies


@pytest.mark.parametrize("content", ["{not json", json.dumps({"no_target_threshold": 1.5}),
                                     json.dumps({"split": "train"})])
def test_a_broken_calibration_file_is_named(tmp_path, content):
  where = checkpoint.locate(_run_dir(tmp_path))
  with open(where.calibration_path, "w", encoding="utf-8") as f:
    f.write(content)
  with pytest.raises(ValueError, match=checkpoint.CALIBRATION_FILE):
    where.config()


def test_several_calibration_sources_pair_datasets_with_splits():
  ccfg = config_lib.load_config("tiny").calibration
  ccfg.update(dataset="ref_custom,ref_coco_m", split="train[:20%],train[:7%]+val")
  assert calibration.sources(ccfg) == [("ref_custom", "train[:20%]"),
                                       ("ref_coco_m", "train[:7%]+val")]
  for dataset, split in (("ref_custom,ref_coco_m", "train"), ("ref_custom,", "a,b")):
    ccfg.update(dataset=dataset, split=split)
    with pytest.raises(ValueError, match=r"config.calibration: dataset=.* as many non-empty"):
      calibration.sources(ccfg)
