"""unires-demo [--workdir=DIR] [--config.key=value ...]: the ShapesParts demo (unires_jax.demo)
on configs/demo.py; the same as `unires-train --config=configs/demo.py --workdir=DIR`."""

import os

from absl import app
from ml_collections import config_flags

from unires_jax.cli import common
from unires_jax.config_lib import REPO_ROOT

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO_ROOT, "configs", "demo.py"), "Config file.", lock_config=False)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.start()
  from unires_jax import demo

  return demo.run(_CONFIG.value, common.FLAGS.workdir or "unires_demo",
                  show_progress=common.FLAGS.progress)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
