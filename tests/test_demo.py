"""The main job: `unires-demo` learns ShapesParts (held-out mIoU >= 2x the best trivial
baseline, N-acc > 0.8), and leaves its table, overlays and checkpoint behind."""

import json
import os
import subprocess
import sys

import pytest

from tests.repo import ROOT as REPO_ROOT


@pytest.mark.slow
def test_demo_learns(tmp_path):
  workdir = tmp_path / "demo"
  # As the README runs it: one CPU device, not the 8 that tests/conftest.py emulates.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run(
      [sys.executable, "-m", "unires_jax.cli.demo", f"--workdir={workdir}", "--progress=false"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=45 * 60, check=False)
  assert run.returncode == 0, f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
  assert "passed: mIoU >=" in run.stdout and "baseline: largest_proposal" in run.stdout
  (result,) = os.listdir(workdir / "eval")  # the held-out evaluator, at the last step
  assert result == "shapes_parts_val_3200.json"
  with open(workdir / "eval" / result, encoding="utf-8") as f:
    record = json.load(f)
  metrics, baselines = record["metrics"], record["baselines"]
  best = max(b["mIoU"] for b in baselines.values())
  assert best > 0.05  # the baselines are computed, not zeros
  assert metrics["mIoU"] >= 2 * best, (metrics, baselines)
  assert metrics["N-acc"] > 0.8, metrics
  assert {"part/mIoU", "object/mIoU", "multi/mIoU", "none/N-acc"} <= set(metrics)
  assert len(os.listdir(workdir / "overlays")) > 0
  assert str(record["step"]) in os.listdir(workdir / "checkpoints")
