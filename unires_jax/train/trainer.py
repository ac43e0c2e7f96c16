"""The training loop: mesh, sharded state, data, step, log, checkpoint, evaluate.

  mesh = make_mesh(config.mesh); state = sharded init (or restore the latest checkpoint,
  together with the input iterator's position; or, in a new run, the parameters of
  `config.train.init_from`: a converted checkpoint or another run);
  loop {batch -> train_step -> log -> checkpoint};
  run the evaluators of `config.evals` (`unires_jax.evaluation.evals`) at the steps they ask
  for; after the last step calibrate the no-target threshold on `config.calibration.split`
  when it is set (`unires_jax.evaluation.calibration`, stored with the final checkpoint) and
  run the evaluators with it.

SIGTERM saves a checkpoint at the current step and returns (`TrainResult.preempted`); a rerun
with the same workdir resumes from it. A run killed outright resumes from its last complete
checkpoint and, the input being deterministic, repeats exactly the steps it had not saved.
"""

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from unires_jax import checkpoint, config_lib, parallel
from unires_jax.data import pipeline, tokenizer
from unires_jax.evaluation import calibration, evals, evaluator, overlays
from unires_jax.metric_writer import MetricWriter
from unires_jax.models.unires import INPUT_KEYS
from unires_jax.train import step as step_lib
from unires_jax.train.checkpointer import Checkpointer
from unires_jax.train.preemption import PreemptionGuard
from unires_jax.train.progress import Progress
from unires_jax.train.state import StateFactory, TrainState

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Training stopped: too many steps in a row had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  factory: StateFactory
  tokenize: Any
  preempted: bool
  eval_results: dict[str, evaluator.EvalResult]
  # The final checkpoint's no-target calibration (`config.calibration`), or None.
  calibration: dict[str, Any] | None = None


def train(config: ml_collections.ConfigDict, workdir: str, *, show_progress: bool = True,
          final_eval: bool = True) -> TrainResult:
  """Trains `config` in `workdir` (resuming when it holds a checkpoint); see the module doc.

  `final_eval=False` skips the evaluation at the end (the caller runs its own).
  """
  tcfg = config.train
  evaluators = evals.from_config(config)
  calibrate = bool(config.get("calibration") and config.calibration.split)
  if calibrate:
    calibration.sources(config.calibration)  # a bad field fails now, not after the last step
  mesh = parallel.make_mesh(config.mesh)
  log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
           jax.process_count())
  if jax.process_index() == 0:
    config_lib.write_config_json(config, workdir)  # what unires-convert and unires-segment read
  tokenize = tokenizer.load_tokenize(config.input.tokenizer)
  factory = StateFactory(config, mesh)
  train_step = step_lib.make_train_step(factory)
  predict = parallel.make_predict(factory.model)
  data = iter(pipeline.train_dataset(config, tokenize))
  checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tcfg.checkpoint_every,
                             keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing)
  if checkpoints.latest_step() is not None:
    state = checkpoints.restore(factory.abstract_sharded(), data)
    log.info("resumed from step %d of %s", int(state.step), checkpoints.directory)
  elif tcfg.init_from:
    state = factory.create(factory.params_from(tcfg.init_from))
    log.info("parameters from %s", tcfg.init_from)
  else:
    state = factory.create()
  writer = MetricWriter(workdir)
  start = int(state.step)
  progress = Progress(tcfg.num_steps, start, config.input.global_batch_size, show_progress)
  preempted, pending, eval_results = False, None, {}
  try:
    with PreemptionGuard() as guard:
      for step in range(start, tcfg.num_steps):
        batch = next(data)
        state, metrics = train_step(state, parallel.shard_batch(step_lib.model_fields(batch),
                                                                mesh))
        if pending is not None:  # the previous step's counter: reading it does not stall
          _check_finite(pending, tcfg.max_nonfinite_in_row)
        pending, done = metrics["nonfinite_in_row"], step + 1
        if done % tcfg.log_every == 0 or done == tcfg.num_steps:
          values = jax.device_get(metrics)
          writer.scalars(done, {**values, **progress.rates(done)})
          progress.update(done, float(values["loss"]))
        if tcfg.image_summary_every and done % tcfg.image_summary_every == 0:
          writer.images(done, _summary_images(predict, state.params, batch, mesh))
        saved = checkpoints.save(done, state, data)
        due = [ev for ev in evaluators if ev.due(done) and done < tcfg.num_steps]
        if due:
          eval_results = evals.run(due, config, state.params, predict, mesh, tokenize, workdir,
                                   done, writer.scalars)
        if guard.requested(done):
          if not saved:
            checkpoints.save(done, state, data, force=True)
          preempted = True
          log.warning("SIGTERM: saved a checkpoint at step %d, stopping", done)
          break
      if pending is not None:
        _check_finite(pending, tcfg.max_nonfinite_in_row)
    final = int(state.step)
    if not preempted and final not in checkpoints.all_steps():
      checkpoints.save(final, state, data, force=True)
    checkpoints.wait_until_finished()
    calibrated = None
    if not preempted and calibrate:
      calibrated = _calibrate(config, state.params, predict, mesh, tokenize, workdir, final)
    if not preempted and final_eval and evaluators:
      eval_results = evals.run(evaluators, calibration.applied(config, calibrated), state.params,
                               predict, mesh, tokenize, workdir, final, writer.scalars)
  finally:
    progress.close()
    checkpoints.close()
    writer.close()
  return TrainResult(state, factory, tokenize, preempted, eval_results, calibrated)


def _calibrate(config, params, predict, mesh, tokenize, workdir: str, step: int
               ) -> dict[str, Any] | None:
  """The final checkpoint's calibration: read when a rerun finds it, else made and saved; None
  (the config's threshold stays, with a warning) when the split cannot choose one."""
  where = checkpoint.locate(workdir, step)
  record = where.calibration()
  if record is None:
    try:
      record = calibration.calibrate(config, params, predict, mesh, tokenize, step)
    except calibration.CalibrationError as e:
      log.warning("no calibration on %s %s (%s): the no-target threshold stays the config's "
                  "%s", config.calibration.dataset, config.calibration.split, e,
                  config.model.no_target_threshold)
      return None
    if jax.process_index() == 0:
      calibration.save(record, where)
  log.info("%s (%s)", calibration.describe(record), record["dataset"])
  return record


def _check_finite(nonfinite_in_row: jax.Array, limit: int) -> None:
  count = int(nonfinite_in_row)
  if count >= limit:
    raise NonFiniteError(
        f"{count} steps in a row had a non-finite loss or gradient (limit "
        f"config.train.max_nonfinite_in_row={limit}); parameters are those of the last finite "
        f"step. Lower config.optimizer.learning_rate or check the input data.")


def _summary_images(predict, params, batch, mesh, count: int = 4) -> dict[str, np.ndarray]:
  """Predicted masks (red) and targets (green) over the first `count` inputs of `batch`."""
  out = predict(params, parallel.shard_batch({k: batch[k] for k in INPUT_KEYS}, mesh))
  logits = evaluator.local_rows(out, mesh)["mask_logits"]
  images = {}
  for i in range(min(count, len(logits))):
    image = overlays.denormalize(batch["image_high"][i])
    images[f"train/prediction_{i}"] = overlays.side_by_side(
        image, logits[i] > 0, batch["masks"][i] > 0.5)
  return images
