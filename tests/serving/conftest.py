"""The web demo's checkpoints: a trained tiny run laid out like an `unires-demo` work directory,
and a converted one."""

import pytest
from flax import nnx

from tests.shapes import CONFIG
from unires_jax import checkpoint, models
from unires_jax.config_lib import load_config
from unires_jax.data import shapes_parts
from unires_jax.train import trainer

# What the page and `unires-segment` are both run with: the tiny model after two steps is not
# sure of much, and a threshold this high makes it answer "target" so that its masks show.
NO_TARGET_THRESHOLD = 0.99
CALIBRATION_IMAGES = 8  # of the 24 training images (tests/shapes.py)


@pytest.fixture(scope="session")
def demo_run(shapes_root, tmp_path_factory) -> str:
  """A training run of the tiny model, two steps on the training tests' ShapesParts data
  (tests/shapes.py; its checkpoint at step 2) and, as in a demo work directory, `raw/` with 3
  held-out ShapesParts images (`raw/annotations/val.json`). As the demo does, it leaves the
  first training images out of training and calibrates the no-target threshold on them."""
  config = load_config(f"{CONFIG}:{shapes_root}")
  config.train.update(num_steps=2, checkpoint_every=2)
  config.input.train.shapes_parts.split = f"train[{CALIBRATION_IMAGES}:]"
  config.calibration.update(dataset="ref_coco_m", split=f"train[:{CALIBRATION_IMAGES}]",
                            batch_size=8)
  config.optimizer.warmup_steps = 0
  run = tmp_path_factory.mktemp("serve") / "run"
  trainer.train(config, str(run), show_progress=False, final_eval=False)
  shapes_parts.write(str(run / "raw"), num_train=0, num_val=3, seed=0)
  return str(run)


@pytest.fixture(scope="session")
def converted_run(tmp_path_factory) -> str:
  """A converted checkpoint of the tiny model (random weights): no training steps."""
  config = load_config("tiny")
  run = tmp_path_factory.mktemp("converted") / "run"
  model = models.build_model(config, nnx.Rngs(0))
  checkpoint.save_converted(nnx.state(model, nnx.Param), config, str(run))
  return str(run)
