"""unires-train --config=configs/<name>.py --workdir=DIR [--config.key=value ...]

Trains (resuming from DIR's latest checkpoint), then evaluates `config.eval.datasets` into
DIR/eval/. A config with a `demo` section (configs/demo.py) runs the whole demo: it writes and
builds its data first and reports against the trivial baselines at the end.
"""

from absl import app, flags

from unires_jax.cli import common

_CONFIG = common.define_config()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  common.start(argv)
  config = _CONFIG.value
  if "demo" in config:
    from unires_jax import demo

    return demo.run(config, common.FLAGS.workdir, show_progress=common.FLAGS.progress)
  from unires_jax.train import trainer

  trainer.train(config, common.FLAGS.workdir, show_progress=common.FLAGS.progress)
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
