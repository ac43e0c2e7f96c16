"""unires-eval --config=configs/<name>.py --workdir=DIR [--step=N]

Evaluates DIR's latest (or `--step`) checkpoint on `config.eval.datasets`, on the mesh of
`config.mesh`, and writes DIR/eval/<dataset>_<split>.json.
"""

import os

from absl import app, flags

from unires_jax.cli import common

_CONFIG = common.define_config()
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  common.start(argv)
  from unires_jax import parallel
  from unires_jax.evaluation import evaluator
  from unires_jax.train import checkpoint, trainer
  from unires_jax.train import step as step_lib
  from unires_jax.train.state import StateFactory

  config = _CONFIG.value
  if not config.eval.datasets:
    raise app.UsageError("config.eval.datasets names no dataset")
  workdir = common.FLAGS.workdir
  mesh = parallel.make_mesh(config.mesh)
  factory = StateFactory(config, mesh)
  params, step = checkpoint.restore_params(os.path.join(workdir, "checkpoints"),
                                           factory.abstract_sharded(), _STEP.value)
  results = trainer.evaluate_all(config, params, step_lib.make_predict(factory), mesh,
                                 trainer.load_tokenize(config), workdir, step)
  print(evaluator.format_table({label: r.metrics for label, r in results.items()}))
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
