"""The flags every command-line program shares, defined once (so that the programs can be
imported together), and their start-up."""

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from unires_jax import config_lib, utils

FLAGS = flags.FLAGS


class _ResolvingParser(flags.ArgumentParser):
  """ml_collections' config-file parser, given the path `config_lib.resolve` finds for
  `configs/x.py[:arg]` (a path from the working directory, else an installed config)."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument):
    file, sep, arg = argument.partition(":")
    return self._parser.parse(config_lib.resolve(file) + sep + arg)

  def flag_type(self) -> str:
    return self._parser.flag_type()


CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file configs/NAME.py[:arg]: a path, or the name of an installed "
    "config (demo, tiny, unires_pp_7b). Override fields with --config.a.b=value.",
    lock_config=False)
FLAGS["config"].parser = _ResolvingParser(FLAGS["config"].parser)

WORKDIR = flags.DEFINE_string("workdir", None,
                              "Run directory: checkpoints, metrics, TensorBoard, eval.")
CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A training work directory (its latest checkpoint, or --step) or a "
    "converted checkpoint (unires-convert from-pytorch).")
STEP = flags.DEFINE_integer("step", None, "Training step to read (default: the latest).")
OUT = flags.DEFINE_string("out", None, "Output: a new directory (unires-convert) or the mask's "
                          "PNG file (unires-segment --image).")
DETECTOR = flags.DEFINE_string(
    "detector", None, "A transformers OWLv2 directory (save_pretrained, with its tokenizer): "
    "proposes the boxes (unires-segment and unires-serve: for inputs given without).")
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 8, "Rows per model call (unires-segment: inputs; unires-serve: requests that "
    "arrive together).")
NO_TARGET_THRESHOLD = flags.DEFINE_float(
    "no_target_threshold", None, "No target when sigmoid(no-target logit) is above it "
    "(default: config.model.no_target_threshold).")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with auto-detection (Cloud TPU, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for an explicit multi-process run (e.g. CPU hosts).")
flags.DEFINE_integer("num_processes", None,
                     "Processes of an explicit multi-process run; with --distributed, the number "
                     "auto-detection must find.")
flags.DEFINE_integer("process_id", None, "This process's index in an explicit run.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def start(argv) -> None:
  """Rejects stray arguments, sets up logging, then calls `jax.distributed.initialize` when the
  flags ask for it."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow", "grain", "httpx"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if FLAGS.coordinator_address:
    missing = [f for f in ("num_processes", "process_id") if getattr(FLAGS, f) is None]
    if missing:
      raise app.UsageError(f"--coordinator_address needs --{missing[0]}")
    # Cross-process collectives of the CPU client (other backends ignore the option). Not
    # `if jax.default_backend() == "cpu"`: that starts the backend, and `initialize` must come
    # first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
    if FLAGS.num_processes is not None and jax.process_count() != FLAGS.num_processes:
      raise RuntimeError(f"--num_processes={FLAGS.num_processes}, but jax.distributed found "
                         f"{jax.process_count()} processes")


def require(*holders: flags.FlagHolder, who: str | None = None) -> None:
  """Raises a UsageError naming the first of `holders` that was not given (and `who` needs
  it, e.g. a subcommand)."""
  for holder in holders:
    if holder.value is None:
      raise app.UsageError(f"{who} needs --{holder.name}" if who
                           else f"--{holder.name} is required")


def load_detector(config, detector_dir: str):
  """The `propose.Detector` of an OWLv2 directory with the settings of `config.proposals` (a
  checkpoint's config; one made before unires-propose gets unires_pp_7b.py's), one image per
  local device and step."""
  from unires_jax import propose

  if "proposals" not in config:
    config.proposals = config_lib.load_config(
        config_lib.resolve("configs/unires_pp_7b.py")).proposals
    logging.getLogger(__name__).info(
        "the checkpoint's config has no proposals section: using unires_pp_7b.py's")
  config.proposals.batch_size = len(jax.local_devices())
  return propose.Detector.from_pretrained(detector_dir, config.proposals)


def run(main, default_config: str | None = None) -> None:
  """`app.run(main)`, with `default_config` as `--config`'s default, and a usage error printed
  as one line and a pointer to `--help` (not the whole help text), exit status 1."""
  if default_config is not None:
    FLAGS.set_default("config", config_lib.resolve(default_config))
  app.run(utils.brief_usage_errors(main))
