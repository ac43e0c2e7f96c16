"""One short run from a converted checkpoint (`config.train.init_from`), with two evaluators from
the config: the run starts from the checkpoint's parameters; `unires-train` runs each evaluator
at the steps it asks for and after the last step, `unires-eval` runs them on a checkpoint; one
JSON per evaluator and step, and the scalars in the run's log. (One run serves both: each
training run costs a compilation.)"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx

from tests.shapes import CONFIG
from unires_jax import checkpoint, models, utils
from unires_jax.config_lib import load_config
from unires_jax.train import trainer

# One worker runs the whole module (--dist loadgroup), so its module fixture `run` (a run with two
# evaluators) is set up once; with the tests spread over both workers each worker set it up.
pytestmark = pytest.mark.xdist_group("init_from")

# name -> (every, protocol, resolution)
EVALS = {"every2": (2, "lisa", 0), "every3": (3, "classic", 24)}
NUM_STEPS = 4


def _flat(params) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {utils.path_str(p): np.asarray(v.get_value()) for p, v in leaves}


def _eval_files(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "eval")))


def _record(workdir, name: str) -> dict:
  with open(os.path.join(workdir, "eval", name), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def run(shapes_root, tmp_path_factory):
  """(config, starting parameters, work directory, TrainResult) of a 4-step run at learning rate
  0 (the parameters stay the ones it started from) from a converted checkpoint, with the
  evaluators of `EVALS`."""
  tmp_path = tmp_path_factory.mktemp("init_from")
  config = load_config(f"{CONFIG}:{shapes_root}")
  config.train.update(num_steps=NUM_STEPS, checkpoint_every=2)
  config.optimizer.update(learning_rate=0.0, warmup_steps=0)
  config.evals = ml_collections.ConfigDict({
      name: dict(dataset="ref_coco_m", split="val", batch_size=8, protocol=protocol,
                 resolution=resolution, every=every)
      for name, (every, protocol, resolution) in EVALS.items()})
  start = nnx.state(models.build_model(config, nnx.Rngs(params=7)), nnx.Param)  # not train.seed
  checkpoint.save_converted(start, config, str(tmp_path / "converted"))
  config.train.init_from = str(tmp_path / "converted")
  workdir = str(tmp_path / "run")
  return config, start, workdir, trainer.train(config, workdir, show_progress=False)


@pytest.mark.slow
def test_a_run_starts_from_a_converted_checkpoint(run, tmp_path):
  config, start, workdir, result = run
  assert int(result.state.step) == NUM_STEPS
  expected, got = _flat(start), _flat(result.state.params)
  assert expected.keys() == got.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(got[path], value, err_msg=path)
  assert checkpoint.locate(workdir).step == NUM_STEPS

  # A converted checkpoint of another model is refused by name before anything trains.
  config = config.copy_and_resolve_references()
  config.model.no_target_hidden = 16
  with pytest.raises(ValueError, match=r"parameter 'no_target_head/.*' is \(.*\) in the "
                                       r"checkpoint, \(.*\) in the config's model"):
    trainer.train(config, str(tmp_path / "other"), show_progress=False, final_eval=False)


@pytest.mark.slow
def test_two_evaluators_run_at_their_steps_and_by_unires_eval(run):
  _, _, workdir, result = run
  assert _eval_files(workdir) == ["every2_2.json", "every2_4.json", "every3_3.json",
                                  "every3_4.json"]
  record = _record(workdir, "every3_3.json")
  assert (record["evaluator"], record["dataset"], record["split"], record["protocol"],
          record["resolution"], record["step"]) == ("every3", "ref_coco_m", "val", "classic", 24,
                                                    3)
  assert record["metrics"]["count"] > 0
  assert "N-acc" not in record["metrics"] and "part/mIoU" in record["metrics"]
  # The last step's results are what train returns, and TensorBoard's scalars are logged too.
  assert _record(workdir, "every2_4.json")["metrics"] == pytest.approx(
      result.eval_results["every2"].metrics, nan_ok=True)
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
  assert len(_eval_files(workdir)) == 5
  record = _record(workdir, "every3_2.json")
  assert (record["protocol"], record["resolution"], record["step"]) == ("classic", 24, 2)
  # At learning rate 0 every checkpoint holds the same parameters: the same metrics.
  assert record["metrics"] == pytest.approx(_record(workdir, "every3_3.json")["metrics"],
                                            nan_ok=True)
