"""`config.train.init_from`: a new run starts from a converted checkpoint's parameters."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.conftest import CONFIG
from unires_jax import checkpoint, models, utils
from unires_jax.config_lib import load_config
from unires_jax.train import trainer


def _flat(params) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {utils.path_str(p): np.asarray(v.get_value()) for p, v in leaves}


@pytest.mark.slow
def test_a_run_starts_from_a_converted_checkpoint(shapes_root, tmp_path):
  config = load_config(f"{CONFIG}:{shapes_root}")
  # One step at learning rate 0: the run's parameters stay the ones it started from.
  config.train.update(num_steps=1, checkpoint_every=1)
  config.optimizer.update(learning_rate=0.0, warmup_steps=0)
  start = nnx.state(models.build_model(config, nnx.Rngs(params=7)), nnx.Param)  # not train.seed
  checkpoint.save_converted(start, config, str(tmp_path / "converted"))

  config.train.init_from = str(tmp_path / "converted")
  result = trainer.train(config, str(tmp_path / "run"), show_progress=False, final_eval=False)
  assert int(result.state.step) == 1
  expected, got = _flat(start), _flat(result.state.params)
  assert expected.keys() == got.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(got[path], value, err_msg=path)
  assert checkpoint.locate(str(tmp_path / "run")).step == 1

  # A converted checkpoint of another model is refused by name before anything trains.
  config.model.no_target_hidden = 16
  with pytest.raises(ValueError, match=r"parameter 'no_target_head/.*' is \(.*\) in the "
                                       r"checkpoint, \(.*\) in the config's model"):
    trainer.train(config, str(tmp_path / "other"), show_progress=False, final_eval=False)
