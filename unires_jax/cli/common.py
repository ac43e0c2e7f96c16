"""The flags every command-line program shares, defined once (so that the programs can be
imported together), their start-up, and how a program ends (`run`): a user's mistake is one line
`<command>: error: <message>` and exit status 2, anything else (a bug) its traceback."""

import difflib
import importlib.metadata
import importlib.util
import linecache
import logging
import os
import re
import sys
import textwrap
import traceback
from typing import Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from unires_jax import config_lib

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
    "config (demo, demo_finetune, tiny, unires_pp_7b). --config.a.b=value overrides any field "
    "of it (e.g. --config.optimizer.learning_rate=1e-4).",
    lock_config=False)
FLAGS["config"].parser = _ResolvingParser(FLAGS["config"].parser)

WORKDIR = flags.DEFINE_string("workdir", None,
                              "Run directory: checkpoints, metrics, TensorBoard, eval.")
CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A training work directory (its latest checkpoint, or --step) or a "
    "converted checkpoint (unires-convert from-pytorch).")
STEP = flags.DEFINE_integer("step", None, "Training step to read (default: the latest).")
OUT = flags.DEFINE_string("out", None, "Output: a new directory (unires-convert, unires-data "
                          "export) or the mask's PNG file (unires-segment --image).")
MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The raw dataset directory (RAW).")
DETECTOR = flags.DEFINE_string(
    "detector", None, "An OWLv2 directory saved by transformers' save_pretrained (the model and "
    "its processor; nothing is downloaded): proposes the boxes (unires-segment and unires-serve: "
    "for inputs given without).")
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 8, "Rows per model call (unires-segment: inputs; unires-serve: requests that "
    "arrive together).")
NO_TARGET_THRESHOLD = flags.DEFINE_float(
    "no_target_threshold", None, "No target when sigmoid(no-target logit) is above it "
    "(default: the threshold calibrated with the checkpoint, no_target_calibration.json, else "
    "config.model.no_target_threshold).")
QUANTIZE = flags.DEFINE_enum(
    "quantize", None, ["none", "int8", "int4"], "Weight-only quantization of the linear layers of "
    "config.model.quantize.parts (the LLM and the CLIP ViT by default; qwix, one scale per "
    "output channel): a float checkpoint is quantized as it loads, one written by "
    "unires-convert quantize loads as stored. The 7B model in bfloat16 holds 14.7 GB of "
    "weights, 7.3 GB in int8 (docs/tpu.md, one chip).")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with auto-detection (Cloud TPU, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for an explicit multi-process run (e.g. CPU hosts).")
flags.DEFINE_integer("num_processes", None,
                     "Processes of an explicit multi-process run; with --distributed, the number "
                     "auto-detection must find.")
flags.DEFINE_integer("process_id", None, "This process's index in an explicit run.")
PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _accelerator_plugins() -> bool:
  """Whether a PJRT plugin (CUDA, ROCm, ...) may add a backend: JAX's `jax_plugins` namespace
  package or entry points, or PJRT_NAMES_AND_LIBRARY_PATHS."""
  if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
    return True
  if importlib.util.find_spec("jax_plugins") is not None:
    return True
  return bool(importlib.metadata.entry_points(group="jax_plugins"))


def cpu_instead_of_absent_tpu(environ, platforms: str | None, tpu_chips: int, nvidia_gpu: bool,
                              plugins: bool) -> bool:
  """Whether JAX should use the CPU without probing for a TPU: no TPU chip, no NVIDIA GPU, no
  accelerator plugin, and neither JAX_PLATFORMS, jax.config's jax_platforms (`platforms`) nor
  JAX_FORCE_TPU_INIT chose otherwise."""
  if environ.get("JAX_PLATFORMS") or platforms or "JAX_FORCE_TPU_INIT" in environ:
    return False
  return not (tpu_chips or nvidia_gpu or plugins)


def skip_absent_tpu() -> bool:
  """On a host without accelerators (`cpu_instead_of_absent_tpu`), JAX uses the CPU without
  first trying libtpu (which `jax[tpu]`, in the test extra, installs): that probe fails there
  anyway, after printing "Failed to find host bounds", "Logging before InitGoogle()" and an
  INVALID_ARGUMENT error about worker hostnames, before anything of ours. TPU chips are found
  on the PCI bus as JAX itself finds them, so a TPU VM keeps its TPU. Returns whether it chose
  the CPU."""
  import jax  # pylint: disable=g-import-not-at-top  (not for --help and flag errors: 1 s)

  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top  (JAX's own probe)
    tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    nvidia_gpu = hardware_utils.has_visible_nvidia_gpu()
  except (ImportError, AttributeError, OSError):  # moved in another JAX: JAX's default
    return False
  if not cpu_instead_of_absent_tpu(os.environ, jax.config.jax_platforms, tpu_chips, nvidia_gpu,
                                   _accelerator_plugins()):
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


def start(argv) -> None:
  """Rejects stray arguments, sets up logging, keeps JAX from probing for an absent TPU
  (`skip_absent_tpu`), then calls `jax.distributed.initialize` when the flags ask for it."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top  (not for --help and flag errors: 1 s)

  skip_absent_tpu()
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


def start_command(argv, commands: Sequence[str]) -> str:
  """The command of `program COMMAND [flags]`: the first argument, one of `commands`; then
  `start` with the rest."""
  if len(argv) < 2 or argv[1] not in commands:
    raise app.UsageError(f"the first argument is the command, one of {tuple(commands)}")
  start([argv[0], *argv[2:]])
  return argv[1]


def require(*holders: flags.FlagHolder, who: str | None = None) -> None:
  """Raises a UsageError naming the first of `holders` that was not given (and `who` needs
  it, e.g. a subcommand)."""
  for holder in holders:
    if holder.value is None:
      raise app.UsageError(f"{who} needs --{holder.name}" if who
                           else f"--{holder.name} is required")


_SAVE_PRETRAINED = ("give a directory saved by transformers' save_pretrained "
                    "(Owlv2ForObjectDetection and its Owlv2Processor, e.g. of "
                    "google/owlv2-base-patch16-ensemble): nothing is downloaded")


def detector_from_dir(detector_dir: str, cfg: ml_collections.ConfigDict):
  """`propose.Detector.from_pretrained(detector_dir, cfg)` for `--detector`: a UsageError naming
  the flag and what the directory lacks (a hub name is no directory) before anything loads."""
  where = f"--detector={detector_dir}"
  if not os.path.isdir(detector_dir):
    raise app.UsageError(f"{where}: no such directory; {_SAVE_PRETRAINED}")
  for what, names in (("config.json", ("config.json",)),
                      ("tokenizer (tokenizer.json or vocab.json)", ("tokenizer.json",
                                                                    "vocab.json"))):
    if not any(os.path.isfile(os.path.join(detector_dir, n)) for n in names):
      raise app.UsageError(f"{where}: no {what} in it; {_SAVE_PRETRAINED}")
  from unires_jax import propose  # pylint: disable=g-import-not-at-top  (jax, transformers)
  from unires_jax.convert import torch_io  # pylint: disable=g-import-not-at-top

  try:
    return propose.Detector.from_pretrained(detector_dir, cfg)
  except torch_io.CheckpointError as e:  # no or broken weights, names the file
    raise app.UsageError(f"{where}: {e}") from e


def load_detector(config, detector_dir: str):
  """The `propose.Detector` of an OWLv2 directory (`detector_from_dir`) with the settings of
  `config.proposals` (a checkpoint's config; one made before unires-propose gets
  unires_pp_7b.py's), one image per local device and step."""
  import jax  # pylint: disable=g-import-not-at-top

  if "proposals" not in config:
    config.proposals = config_lib.load_config(
        config_lib.resolve("configs/unires_pp_7b.py")).proposals
    logging.getLogger(__name__).info(
        "the checkpoint's config has no proposals section: using unires_pp_7b.py's")
  config.proposals.batch_size = len(jax.local_devices())
  return detector_from_dir(detector_dir, config.proposals)


# --- How a program ends -------------------------------------------------------------------------

TRACEBACK_ENV = "UNIRES_TRACEBACK"  # =1: a user's mistake shows its traceback too (bug reports)

# A path the user gave that is missing, already there, of the wrong kind or not readable.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
# The project's own code: a ValueError raised here on purpose describes a bad input (a config
# field, a checkpoint, a record, a detector directory: `CheckpointError` and `RecordError` are
# ValueErrors); one raised inside a library (NumPy, JAX, ...) is a bug.
_OWN_CODE = tuple(
    os.path.abspath(folder) + os.sep for name in ("unires_jax", "tfds_builders")
    for folder in (importlib.util.find_spec(name).submodule_search_locations or ()))


def _raised_on_purpose(error: BaseException) -> bool:
  """Whether the innermost frame of `error`'s traceback is a `raise` statement of this project
  (not, e.g., `int(text)` in our code or a check inside NumPy)."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = tb.tb_frame.f_code.co_filename
  line = linecache.getline(filename, tb.tb_lineno).lstrip()
  return filename.startswith(_OWN_CODE) and line.startswith("raise ")


def is_user_error(error: BaseException) -> bool:
  """A mistake in what the user gave (see the module doc), as opposed to a bug."""
  if isinstance(error, (app.UsageError, flags.Error) + _PATH_ERRORS):
    return True
  return isinstance(error, ValueError) and _raised_on_purpose(error)


def _one_line(error: BaseException) -> str:
  if isinstance(error, OSError) and error.filename and error.strerror:  # open() and friends
    return f"{error.filename}: {error.strerror}"
  text = str(error)
  if "Traceback (most recent call last):" in text:  # ml_collections: a config file's get_config
    head = text.split("Traceback (most recent call last):")[0]
    last = [line for line in text.splitlines() if line.strip()][-1]
    text = (head.replace("Error whilst parsing config file:", "").strip() + " "
            + last.removeprefix("ValueError: "))
  return " ".join(text.split()) or type(error).__name__


def _report(command: str, error: BaseException, hint: str = "") -> int:
  """Prints `error` as one line (after its traceback with UNIRES_TRACEBACK=1); returns the exit
  status of a user's mistake, 2."""
  sys.stdout.flush()
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    traceback.print_exception(error)
  print(f"{command}: error: {_one_line(error)}{hint}", file=sys.stderr, flush=True)
  return 2


# --- --config.a.b=value overrides -----------------------------------------------------------------

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([\w.]+)(?:=|$)")
_CONFIG = re.compile(r"^--?config(?:=(.*))?$")


def _paths(config, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out += _paths(value, f"{prefix}{key}.")
  return out


def bad_override(argv: Sequence[str], default_config: str | None) -> str | None:
  """For the first `--config.a.b=...` of `argv` that names no field of the config: a line naming
  it, the closest existing field and the config; None when every override names a field."""
  spec, overrides = default_config, []
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    if match := _CONFIG.match(arg):
      spec = match.group(1) if match.group(1) is not None else (
          argv[i + 1] if i + 1 < len(argv) else None)
    elif match := _OVERRIDE.match(arg):
      overrides.append(match.group(1))
  if not spec or not overrides:
    return None
  try:
    config = config_lib.load_config(spec)
  except Exception:  # pylint: disable=broad-except  (the config itself fails: not ours to name)
    return None
  for path in overrides:
    node, keys = config, path.split(".")
    for depth, key in enumerate(keys):
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        break  # e.g. an index into a tuple: ml_collections' own message stands
      if key not in node:
        parent = ".".join(keys[:depth])
        near = difflib.get_close_matches(key, list(node.keys()), n=1, cutoff=0.6)
        near = [f"{parent}.{near[0]}" if parent else near[0]] if near else (
            difflib.get_close_matches(path, _paths(config), n=1, cutoff=0.6))
        where = f"config.{parent}" if parent else "the config"
        closest = (f"the closest is {near[0]}" if near else
                   f"{where} has {', '.join(sorted(node.keys()))}")
        return (f"--config.{path}: {spec.partition(':')[0]} has no field "
                f"{'.'.join(keys[:depth + 1])}; {closest}")
      node = node[key]
  return None


# --- --help ---------------------------------------------------------------------------------------

_HELP = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
MULTI_HOST = ("multi-host",
              ("distributed", "coordinator_address", "num_processes", "process_id"))

FlagGroups = Sequence[tuple[str, Sequence[str | flags.FlagHolder]]]


def _names(groups: FlagGroups) -> list[tuple[str, list[str]]]:
  return [(title, [f if isinstance(f, str) else f.name for f in holders])
          for title, holders in groups]


def _describe(flag: flags.Flag, default) -> str:
  text = f"--[no]{flag.name}: {flag.help}" if flag.boolean else f"--{flag.name}: {flag.help}"
  if isinstance(default, bool):
    text += f" (default: {str(default).lower()})"
  elif isinstance(default, (list, tuple)):
    text += f" (default: {','.join(map(str, default))})"
  elif default is not None:
    text += f" (default: {default})"
  return textwrap.fill(text, 100, initial_indent="  ", subsequent_indent="      ",
                       break_on_hyphens=False, break_long_words=False)


def help_text(command: str, doc: str, groups: FlagGroups,
              default_config: str | None = None) -> str:
  """`--help`: the command's doc, then its flags by group, then where the others are."""
  lines = [doc.strip(), ""]
  for title, names in _names([*groups, MULTI_HOST]):
    lines.append(f"{title}:")
    for name in names:
      flag = FLAGS[name]
      default = default_config if name == "config" else flag.default
      lines.append(_describe(flag, default))
    lines.append("")
  lines.append(textwrap.fill(
      f"`{command} --helpfull` lists every flag, also absl's and those of the other programs. "
      f"A mistake in the input prints one line and exits with status 2; {TRACEBACK_ENV}=1 adds "
      "its traceback (for a bug report).", 100, break_on_hyphens=False))
  return "\n".join(lines)


def _declare_key_flags(groups: FlagGroups) -> None:
  """absl's key flags of the main module (what its `--help` lists): the flags of `groups`,
  which the program's own module and this one define."""
  for _, names in _names([*groups, MULTI_HOST]):
    for name in names:
      FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


def run(main: Callable[[list[str]], int | None], command: str, doc: str, groups: FlagGroups,
        default_config: str | None = None) -> None:
  """`app.run(main)` for the program `command` (e.g. "unires-eval"), described by `doc` (its
  module's docstring: a description line first), with the flags of `groups` (title, flags) as
  its `--help` and `default_config` as `--config`'s default. A user's mistake, in the flags or
  while `main` runs (`is_user_error`), ends it with one line and exit status 2."""
  _declare_key_flags(groups)
  main_module = sys.modules.get("__main__")
  if main_module is not None and not main_module.__doc__:
    main_module.__doc__ = doc  # absl's --helpfull prints it

  def parse(argv: list[str]) -> list[str]:
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in _HELP for a in args):
      print(help_text(command, doc, groups, default_config))
      raise SystemExit(0)
    hint = f" (`{command} --help` lists the flags)"
    try:
      FLAGS.set_default("config", default_config and config_lib.resolve(default_config))
      return FLAGS(argv)
    except flags.Error as e:  # an unknown flag, a bad value, a config file that does not load
      message = bad_override(argv, default_config)
      raise SystemExit(_report(command, app.UsageError(message) if message else e,
                               "" if message else hint)) from None
    except Exception as e:  # pylint: disable=broad-except
      message = bad_override(argv, default_config)  # ml_collections: AttributeError, KeyError
      if message is None:
        raise
      raise SystemExit(_report(command, app.UsageError(message))) from None

  def guarded(argv: list[str]) -> int:
    try:
      return main(argv) or 0
    except Exception as e:  # pylint: disable=broad-except
      if not is_user_error(e):
        raise
      return _report(command, e)

  app.run(guarded, flags_parser=parse)
