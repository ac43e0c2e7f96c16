"""unires-demo [--workdir=DIR] [--config.key=value ...]: the ShapesParts demo (unires_jax.demo)
on configs/demo.py; the same as `unires-train --config=configs/demo.py --workdir=DIR`."""

import os

from absl import app

from unires_jax.cli import common
from unires_jax.config_lib import REPO_ROOT

_CONFIG = common.define_config(os.path.join(REPO_ROOT, "configs", "demo.py"))


def main(argv) -> int:
  common.start(argv)
  from unires_jax import demo

  return demo.run(_CONFIG.value, common.FLAGS.workdir or "unires_demo",
                  show_progress=common.FLAGS.progress)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
