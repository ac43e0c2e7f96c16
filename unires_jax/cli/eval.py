"""unires-eval: runs the evaluators of a config on a checkpoint.

  unires-eval --workdir=DIR [--config=configs/<name>.py] [--step=N] [--evals=a,b]
      [--quantize=int8|int4] [--no_target_threshold=P]

Runs the evaluators of `config.evals` (all, or those `--evals` names) on DIR's latest (or
`--step`) checkpoint, on the mesh of `config.mesh`, and writes DIR/eval/<name>_<step>.json and
TensorBoard scalars. The config is `--config` (with any `--config.a.b=value`), or else the run's
own DIR/config.json. `--workdir` may also be a converted checkpoint (written as step 0). The
no-target threshold is the one calibrated with the checkpoint (also under a `--config`), unless
`--no_target_threshold` gives another.
"""

from absl import app, flags

from unires_jax.cli import common

_EVALS = flags.DEFINE_list("evals", None, "Evaluators of config.evals to run (default: all).")


def main(argv) -> int:
  common.start(argv)
  common.require(common.WORKDIR)
  from unires_jax import checkpoint, inference, parallel
  from unires_jax.data import tokenizer
  from unires_jax.evaluation import calibration, evals, evaluator
  from unires_jax.metric_writer import MetricWriter

  workdir = common.WORKDIR.value
  located = checkpoint.locate(workdir, common.STEP.value)
  config = common.CONFIG.value or located.config()
  # The no-target threshold: --no_target_threshold, else the checkpoint's calibration (under a
  # --config of another run's too: the threshold belongs to the weights), else the config's.
  threshold = common.NO_TARGET_THRESHOLD.value
  if threshold is not None:
    if not 0 < threshold < 1:
      raise app.UsageError(f"--no_target_threshold={threshold} must be in (0, 1)")
    config.model.no_target_threshold = threshold
  elif common.CONFIG.value:
    config = calibration.applied(config, located.calibration())
  # The parameters in the compute dtype (bfloat16 in the 7B recipe), not training's float32.
  config = inference.inference_config(config, common.QUANTIZE.value)
  evaluators = evals.from_config(config)
  if _EVALS.value:
    unknown = sorted(set(_EVALS.value) - {ev.name for ev in evaluators})
    if unknown:
      raise app.UsageError(f"--evals names {unknown[0]!r}, which config.evals does not have "
                           f"({[ev.name for ev in evaluators]})")
    evaluators = [ev for ev in evaluators if ev.name in _EVALS.value]
  if not evaluators:
    raise app.UsageError("config.evals holds no evaluator")
  model, params, step = inference.restore(workdir, config, parallel.make_mesh(config.mesh),
                                          common.STEP.value)
  writer = MetricWriter(workdir)
  try:
    results = evals.run(evaluators, model.config, params, parallel.make_predict(model), model.mesh,
                        tokenizer.load_tokenize(config.input.tokenizer), workdir, step or 0,
                        writer.scalars)
  finally:
    writer.close()
  print(evaluator.format_table({name: r.metrics for name, r in results.items()}))
  return 0


FLAG_GROUPS = (("run", (common.WORKDIR, common.STEP, _EVALS, common.CONFIG, common.QUANTIZE,
                         common.NO_TARGET_THRESHOLD)),)


def run():
  common.run(main, "unires-eval", __doc__, FLAG_GROUPS)


if __name__ == "__main__":
  run()
