"""unires-demo: the ShapesParts demo, from data to held-out metrics, on a CPU in minutes.

  unires-demo [--workdir=DIR] [--config=configs/demo.py] [--config.key=value ...]

`unires_jax.demo`: writes and builds its data, trains, and reports the held-out metrics beside
the trivial baselines against its bar."""

from unires_jax.cli import common

DEFAULT_CONFIG = "configs/demo.py"


def main(argv) -> int:
  common.start(argv)
  from unires_jax import demo

  return demo.run(common.CONFIG.value, common.WORKDIR.value or "unires_demo",
                  show_progress=common.PROGRESS.value)


FLAG_GROUPS = (("run", (common.WORKDIR, common.CONFIG, common.PROGRESS)),)


def run():
  common.run(main, "unires-demo", __doc__, FLAG_GROUPS, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
  run()
