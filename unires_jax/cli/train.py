"""unires-train: trains UniRES++ (resuming), with checkpoints, metrics and evaluations.

  unires-train --config=configs/<name>.py --workdir=DIR [--config.key=value ...]

Trains (resuming from DIR's latest checkpoint), running the evaluators of `config.evals` at the
steps they ask for and after the last step (results in DIR/eval/<name>_<step>.json).
"""

from unires_jax.cli import common


def main(argv) -> int:
  common.start(argv)
  common.require(common.CONFIG, common.WORKDIR)
  from unires_jax.train import trainer

  trainer.train(common.CONFIG.value, common.WORKDIR.value, show_progress=common.PROGRESS.value)
  return 0


FLAG_GROUPS = (("run", (common.CONFIG, common.WORKDIR, common.PROGRESS)),)


def run():
  common.run(main, "unires-train", __doc__, FLAG_GROUPS)


if __name__ == "__main__":
  run()
