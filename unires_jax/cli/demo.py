"""unires-demo [--workdir=DIR] [--config=configs/demo.py] [--config.key=value ...]: the
ShapesParts demo (`unires_jax.demo`): writes and builds its data, trains, and reports the
held-out metrics beside the trivial baselines against its bar."""

from unires_jax.cli import common

DEFAULT_CONFIG = "configs/demo.py"


def main(argv) -> int:
  common.start(argv)
  from unires_jax import demo

  return demo.run(common.CONFIG.value, common.WORKDIR.value or "unires_demo",
                  show_progress=common.FLAGS.progress)


def run():
  common.run(main, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
  run()
