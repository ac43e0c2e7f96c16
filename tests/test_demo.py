"""The main job, `unires-demo`, run as the README runs it but short: the data written and built,
the tiny UniRES++ trained from scratch, its no-target threshold calibrated on training images it
left out, the held-out split scored beside the baselines, overlays and checkpoint left behind.

The README's full demo (4800 steps on 3999 images, about 13 minutes on 2 cores) is its own check:
it exits 1 below its bar, and `benchmarks/demo_seeds.py` measures it over seeds
(`docs/demo.md`). Here SHORT_RUN's 1200 steps on 1000 images (about 4 minutes on 2 cores) show
what a run that short can show honestly, its bar set in the demo's own config fields
(`config.demo.*`), so that the demo's exit status is the check: the loss falls, held-out mIoU
clears the best trivial baseline by a margin, and the no-target verdict beats a coin both ways.

The margins, measured once at three training seeds (`benchmarks/demo_seeds.py --seeds=0,1,2`
with SHORT_RUN's flags, 2026-12-07): MARGINS below.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.repo import ROOT as REPO_ROOT

CALIBRATION_IMAGES = 100
SHORT_RUN = (
    f"--config.demo.num_train={CALIBRATION_IMAGES + 1000}", "--config.demo.num_val=100",
    "--config.demo.num_overlays=4",
    f"--config.calibration.split=train[:{CALIBRATION_IMAGES}]",
    f"--config.input.train.shapes_parts.split=train[{CALIBRATION_IMAGES}:]",
    "--config.train.num_steps=1200", "--config.optimizer.warmup_steps=100",
    "--config.train.checkpoint_every=1200", "--config.train.log_every=100",
    "--config.train.image_summary_every=0",
    # The no-target head of the config before it became 128 wide (configs/demo.py): the full
    # demo gains from the width (docs/demo.md), a run this short loses. With 128, measured
    # 2026-12-07 at seeds 0, 1, 2: mIoU 1.52x / 1.44x / 1.14x the best baseline, N-acc 0.815 /
    # 0.852 / 0.944, T-acc 0.781 / 0.681 / 0.583 (seed 2 below this test's bar); MARGINS below
    # are the 32-wide head's.
    "--config.model.no_target_hidden=32")
# What the short run must show (the demo exits 1 below the first two).
MIN_BASELINE_RATIO = 1.3  # held-out mIoU over the best trivial baseline's
MIN_N_ACC = 0.6  # and T-acc above the same: the verdict beats a coin both ways
MAX_LATE_LOSS = 4.0  # the mean training loss of the last 3 logged steps (of 100 each) ...
LOSS_DROP = 0.85  # ... and at most this fraction of the first 3's
MARGINS = """
seed  mIoU / best baseline  N-acc  T-acc  loss first 3 -> last 3
   0  0.280 / 0.176 = 1.59  0.759  0.747  4.87 -> 3.29 (0.68x)
   1  0.252 / 0.176 = 1.43  0.870  0.664  5.00 -> 3.31 (0.66x)
   2  0.282 / 0.176 = 1.60  0.778  0.750  4.89 -> 3.56 (0.73x)
the least margin: mIoU 1.43x against 1.3x, T-acc 0.664 against 0.6, late loss 3.56 against 4.0
"""


@pytest.mark.slow
def test_a_short_demo_learns(tmp_path):
  workdir = tmp_path / "demo"
  # As the README runs it: one CPU device, not the 8 that tests/conftest.py emulates.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run(
      [sys.executable, "-m", "unires_jax.cli.demo", f"--workdir={workdir}", "--progress=false",
       *SHORT_RUN, f"--config.demo.min_baseline_ratio={MIN_BASELINE_RATIO}",
       f"--config.demo.min_n_acc={MIN_N_ACC}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=20 * 60, check=False)
  assert run.returncode == 0, f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
  assert "passed: mIoU >=" in run.stdout and "baseline: largest_proposal" in run.stdout

  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  first, late = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
  assert late < MAX_LATE_LOSS and late < LOSS_DROP * first, losses

  (result,) = os.listdir(workdir / "eval")  # the held-out evaluator, at the last step
  assert result == "shapes_parts_val_1200.json"
  with open(workdir / "eval" / result, encoding="utf-8") as f:
    record = json.load(f)
  metrics, baselines = record["metrics"], record["baselines"]
  best = max(b["mIoU"] for b in baselines.values())
  assert best > 0.05  # the baselines are computed, not zeros
  assert metrics["mIoU"] >= MIN_BASELINE_RATIO * best, (metrics, baselines)
  assert metrics["N-acc"] > MIN_N_ACC and metrics["T-acc"] > MIN_N_ACC, metrics
  assert {"part/mIoU", "object/mIoU", "multi/mIoU", "none/N-acc"} <= set(metrics)
  assert len(os.listdir(workdir / "overlays")) == 4

  # The threshold was chosen on the left-out training images and is the checkpoint's own.
  calibration = json.loads(
      (workdir / "checkpoints" / "1200" / "no_target_calibration.json").read_text())
  assert calibration["split"] == f"train[:{CALIBRATION_IMAGES}]" and calibration["step"] == 1200
  assert f"no-target threshold {calibration['no_target_threshold']:.3f}, calibrated on" in (
      run.stdout)
