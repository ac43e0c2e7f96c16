"""One process of a multi-process training run: `unires-train`, recording what this process saw.

  python -m tests.train.multiprocess_driver --config=... --workdir=DIR \
      --coordinator_address=localhost:PORT --num_processes=N --process_id=I [unires-train flags]

Runs the `unires-train` program's `main` unchanged (so `jax.distributed.initialize` and the
trainer run as in production) with three observers hooked in from outside, then writes
`DIR/process_<I>.json`:

  losses:         {step: loss} as *this* process read the step's metrics (the trainer's metric
                  writer only records process 0's view)
  scalars:        every scalar of those steps
  expression_ids: per step, the expressions of this process's rows of the global batch
  param_digest:   SHA-256 of this process's copy of the final parameters (`param_digest`)
  eval_metrics:   this process's result of the final evaluation, per dataset label
"""

import hashlib
import json
import os
import sys
import traceback
from typing import Any

import jax
import numpy as np
from absl import app

from unires_jax import utils
from unires_jax.train import step as step_lib
from unires_jax.train import trainer

_seen: dict[str, Any] = {"scalars": [], "expression_ids": [], "result": None}


def local_copy(value: jax.Array) -> np.ndarray:
  """This process's copy of a parameter: its first local device's, when the array is
  replicated (every local copy must then be bitwise equal); otherwise gathered (collective)."""
  if value.is_fully_replicated:
    copies = [np.asarray(s.data) for s in value.addressable_shards]
    for other in copies[1:]:
      if other.tobytes() != copies[0].tobytes():
        raise AssertionError("the local replicas of a parameter differ")
    return copies[0]
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def param_digest(params) -> str:
  """SHA-256 over every parameter's path, dtype, shape and bytes (this process's copy)."""
  digest = hashlib.sha256()
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    array = local_copy(value)
    digest.update(f"{utils.path_str(path)}|{array.dtype}|{array.shape}|".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


class _RecordingWriter(trainer.MetricWriter):
  """The trainer's writer (process 0 still writes metrics.jsonl) that also keeps, on every
  process, the training scalars this process read."""

  def scalars(self, step, values, prefix=""):
    if not prefix:
      _seen["scalars"].append({"step": int(step), **{k: float(v) for k, v in values.items()}})
    super().scalars(step, values, prefix)


def _install_observers() -> None:
  """Hooks the observers into the trainer's module attributes (nothing in the trainer changes)."""
  model_fields, train = step_lib.model_fields, trainer.train

  def recording_model_fields(batch):
    _seen["expression_ids"].append([int(i) for i in np.asarray(batch["expression_id"])])
    return model_fields(batch)

  def recording_train(*args, **kwargs):
    _seen["result"] = train(*args, **kwargs)
    return _seen["result"]

  step_lib.model_fields = recording_model_fields
  trainer.train = recording_train
  trainer.MetricWriter = _RecordingWriter


def _record() -> dict[str, Any]:
  result = _seen["result"]
  rate_keys = ("steps_per_second", "examples_per_second")  # timings: differ between processes
  scalars = [{k: v for k, v in s.items() if k not in rate_keys} for s in _seen["scalars"]]
  return {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "losses": {str(s["step"]): s["loss"] for s in scalars},
      "scalars": scalars,
      "expression_ids": _seen["expression_ids"],
      "final_step": int(result.state.step),
      "param_digest": param_digest(result.state.params),
      "eval_metrics": {label: r.metrics for label, r in result.eval_results.items()},
  }


def _run(argv) -> int:
  # pylint: disable=g-import-not-at-top
  from unires_jax.cli import common
  from unires_jax.cli import train as train_cli

  _install_observers()
  code = train_cli.main(argv)
  record = _record()
  path = os.path.join(common.FLAGS.workdir, f"process_{jax.process_index()}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, allow_nan=True)
  return code


def main(argv) -> int:
  """`_run`, but a failure exits at once: a normal exit would first wait (minutes) at
  `jax.distributed`'s shutdown barrier for the other processes, stuck in a collective."""
  try:
    return _run(argv)
  except Exception:  # noqa: BLE001 -- whatever failed, report it and leave at once
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


if __name__ == "__main__":
  # The program's flags. Imported here only: the test imports this module for `param_digest`
  # and should not define absl flags in its own process.
  from unires_jax.cli import train  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  app.run(main)
