"""Flags and start-up shared by the command-line programs."""

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard, eval.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with auto-detection (Cloud TPU, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for an explicit multi-process run (e.g. CPU hosts).")
flags.DEFINE_integer("num_processes", None,
                     "Processes of an explicit multi-process run; with --distributed, the number "
                     "auto-detection must find.")
flags.DEFINE_integer("process_id", None, "This process's index in an explicit run.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def define_config(default: str | None = None):
  """The `--config=configs/x.py[:arg]` flag (with `--config.a.b=value` overrides)."""
  return config_flags.DEFINE_config_file("config", default, "Config file (configs/*.py).",
                                         lock_config=False)


def start(argv) -> None:
  """Rejects stray arguments, sets up logging, then calls `jax.distributed.initialize` when the
  flags ask for it."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if FLAGS.coordinator_address:
    missing = [f for f in ("num_processes", "process_id") if getattr(FLAGS, f) is None]
    if missing:
      raise flags.ValidationError(f"--coordinator_address needs --{missing[0]}")
    # Cross-process collectives of the CPU client (other backends ignore the option). Not
    # `if jax.default_backend() == "cpu"`: that starts the backend, and `initialize` must come first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
    if FLAGS.num_processes is not None and jax.process_count() != FLAGS.num_processes:
      raise RuntimeError(f"--num_processes={FLAGS.num_processes}, but jax.distributed found "
                         f"{jax.process_count()} processes")
