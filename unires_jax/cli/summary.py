r"""unires-summary: the parameter count of each UniRES++ component, from shapes only.

  unires-summary [--config=configs/unires_pp_7b.py] [--config.key=value ...]

The model is built under `nnx.eval_shape`: a 7B config allocates nothing."""

from unires_jax.cli import common

DEFAULT_CONFIG = "configs/unires_pp_7b.py"


def main(argv) -> int:
  common.start(argv)
  from unires_jax.models import summary

  print(summary.format_table(summary.count_by_component(common.CONFIG.value)))
  return 0


FLAG_GROUPS = (("model", (common.CONFIG,)),)


def run():
  common.run(main, "unires-summary", __doc__, FLAG_GROUPS, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
  run()
