"""Evaluators from the config: `unires-train` runs each at the steps it asks for and after the
last step, `unires-eval` runs them on a checkpoint; one JSON per evaluator and step, and the
scalars in the run's log."""

import json
import os

import ml_collections
import pytest
from absl import flags

from tests.train.conftest import CONFIG
from unires_jax.config_lib import load_config
from unires_jax.train import trainer

# name -> (every, protocol, resolution)
EVALS = {"every2": (2, "lisa", 0), "every3": (3, "classic", 24)}
NUM_STEPS = 4


def _eval_files(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "eval")))


@pytest.mark.slow
def test_two_evaluators_run_at_their_steps_and_by_unires_eval(shapes_root, tmp_path):
  config = load_config(f"{CONFIG}:{shapes_root}")
  config.train.update(num_steps=NUM_STEPS, checkpoint_every=2)
  config.evals = ml_collections.ConfigDict({
      name: dict(dataset="ref_coco_m", split="val", batch_size=8, protocol=protocol,
                 resolution=resolution, every=every)
      for name, (every, protocol, resolution) in EVALS.items()})
  workdir = str(tmp_path / "run")
  result = trainer.train(config, workdir, show_progress=False)

  assert _eval_files(workdir) == ["every2_2.json", "every2_4.json", "every3_3.json",
                                  "every3_4.json"]
  with open(os.path.join(workdir, "eval", "every3_3.json"), encoding="utf-8") as f:
    record = json.load(f)
  assert (record["evaluator"], record["dataset"], record["split"], record["protocol"],
          record["resolution"], record["step"]) == ("every3", "ref_coco_m", "val", "classic", 24,
                                                    3)
  assert record["metrics"]["count"] > 0
  assert "N-acc" not in record["metrics"] and "part/mIoU" in record["metrics"]
  # The last step's results are what train returns, and TensorBoard's scalars are logged too.
  with open(os.path.join(workdir, "eval", "every2_4.json"), encoding="utf-8") as f:
    assert json.load(f)["metrics"] == pytest.approx(result.eval_results["every2"].metrics,
                                                    nan_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  assert sorted((r["step"], k.split("/")[1]) for r in logged for k in r
                if k.startswith("eval/") and k.endswith("/mIoU") and k.count("/") == 2) == [
                    (2, "every2"), (3, "every3"), (4, "every2"), (4, "every3")]

  # unires-eval on the step-2 checkpoint, one evaluator, the run's own config.json.
  from unires_jax.cli import eval as eval_cli  # pylint: disable=g-import-not-at-top

  flags.FLAGS.unparse_flags()
  flags.FLAGS(["unires-eval", f"--workdir={workdir}", "--step=2", "--evals=every3"])
  assert eval_cli.main(["unires-eval"]) == 0
  assert "every3_2.json" in _eval_files(workdir)
  assert len(_eval_files(workdir)) == 5
  with open(os.path.join(workdir, "eval", "every3_2.json"), encoding="utf-8") as f:
    record = json.load(f)
  assert (record["protocol"], record["resolution"]) == ("classic", 24)
