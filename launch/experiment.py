"""An experiment: a config file, overrides for every trial and a sweep over more, each trial
checked against the config before anything is launched; and the records that go into its work
directory.

  WORKDIR/experiment.json      the definition (config, overrides, sweep, executor) and trials
  WORKDIR/<trial>/config.json  the trial's resolved config  } next to its checkpoints
  WORKDIR/<trial>/launch.json  its command, git revision    }

A work directory holds one experiment: launching another definition into it is an error, the
same one again resumes its trials (unires-train continues from their checkpoints).
"""

import ast
import dataclasses
import json
import shlex
import subprocess
from typing import Any

import ml_collections
from etils import epath

from launch import sweep as sweep_lib
from launch import REPO_ROOT
from unires_jax.config_lib import load_config

EXPERIMENT_FILE = "experiment.json"

# The programs a trial can run (unires_jax/cli/<program>.py): unires-train, or unires-demo
# (which writes and builds its own data first).
PROGRAMS = ("train", "demo")


@dataclasses.dataclass(frozen=True)
class Trial:
  index: int
  overrides: dict[str, Any]  # the experiment's overrides, then this trial's sweep values

  @property
  def name(self) -> str:
    return f"{self.index:03d}"

  def config_args(self) -> list[str]:
    """`--config.key=value` arguments for unires-train."""
    return [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: str  # configs/x.py[:arg], as unires-train takes it
  overrides: dict[str, Any]
  sweep: str
  executor: str
  workdir: str
  trials: tuple[Trial, ...]
  program: str = "train"  # what every trial runs: one of PROGRAMS

  @property
  def module(self) -> str:
    """The Python module of the trials' program (`python -m ...`)."""
    return f"unires_jax.cli.{self.program}"

  def definition(self) -> dict[str, Any]:
    """What makes two launches the same experiment."""
    return {"config": self.config, "overrides": self.overrides, "sweep": self.sweep,
            "executor": self.executor, "program": self.program}

  def trial_dir(self, trial: Trial) -> str:
    return f"{self.workdir}/{trial.name}"

  def pod_train_flags(self, trial: Trial, hosts: int) -> list[str]:
    """unires-train's flags on each of `hosts` TPU workers: `jax.distributed.initialize()` finds
    the others through the TPU metadata and checks there are `hosts` processes."""
    return [f"--config={self.config}", f"--workdir={self.trial_dir(trial)}", "--distributed",
            f"--num_processes={hosts}", "--progress=false", *trial.config_args()]


def make(config: str, overrides: list[str], sweep: str, executor: str,
         workdir: str, program: str = "train") -> Experiment:
  """Parses and checks the experiment; raises ValueError naming what is wrong.

  Args:
    config: `configs/x.py[:arg]`.
    overrides: `key=value` strings applied to every trial (value: a Python literal, else text).
    sweep: a `launch.sweep` expression ("" = one trial).
    executor: its name, recorded in the definition.
    workdir: local path or gs://...; trial t runs in `workdir/<t.name>`.
  """
  if not workdir:
    raise ValueError("--workdir is required")
  if program not in PROGRAMS:
    raise ValueError(f"--program={program!r}; programs: {PROGRAMS}")
  base = load_config(config)
  fixed = dict(_parse_override(o) for o in overrides)
  trials = []
  for i, point in enumerate(sweep_lib.parse(sweep)):
    clash = sorted(set(point) & set(fixed))
    if clash:
      raise ValueError(f"{clash[0]!r} is both swept (--sweep) and fixed (--set)")
    trials.append(Trial(i, {**fixed, **point}))
  for trial in trials:
    resolve(base, trial.overrides, config)
  return Experiment(config, fixed, sweep, executor, workdir.rstrip("/"), tuple(trials), program)


def resolve(base: ml_collections.ConfigDict, overrides: dict[str, Any],
            config_name: str) -> ml_collections.ConfigDict:
  """A copy of `base` with the overrides set; a clear error for a key not in the config or a
  value of the wrong type."""
  config = base.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents + [leaf]):
      fields = node.keys() if isinstance(node, ml_collections.ConfigDict) else ()
      if part not in fields:
        where = ".".join(parents[:i]) or "the top level"
        raise ValueError(f"config key {key!r} is not in {config_name} (no {part!r} in {where}; "
                         f"it has {sorted(fields)})")
      if part != leaf:
        node = node[part]
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ValueError(f"config key {key!r} of {config_name} is a section, not a value")
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"config key {key!r} of {config_name}: {e}") from None
  return config


def check_workdir(experiment: Experiment) -> None:
  """Raises if the work directory holds another experiment; reads, never writes."""
  path = epath.Path(experiment.workdir) / EXPERIMENT_FILE
  try:
    exists = path.exists()
  except Exception as e:  # pylint: disable=broad-except  # e.g. gs:// without credentials
    raise OSError(f"cannot read {path}: {type(e).__name__}: {e}") from e
  if not exists:
    return
  try:
    held = json.loads(path.read_text())["definition"]
  except (ValueError, KeyError) as e:
    raise ValueError(f"{path} is not an experiment record: {e}") from None
  mine = _jsonable(experiment.definition())
  if held != mine:
    diff = sorted(k for k in held.keys() | mine.keys() if held.get(k) != mine.get(k))
    raise ValueError(f"--workdir={experiment.workdir} already holds another experiment "
                     f"(its {', '.join(diff)} differ: {path}); choose a new work directory")


def write_records(experiment: Experiment, commands: dict[str, str]) -> None:
  """experiment.json, and each trial's config.json and launch.json (`commands[trial.name]`)."""
  revision = git_revision()
  root = epath.Path(experiment.workdir)
  base = load_config(experiment.config)
  for trial in experiment.trials:
    tdir = root / trial.name
    tdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(tdir / "config.json",
                  resolve(base, trial.overrides, experiment.config).to_json_best_effort(indent=2))
    _write_atomic(tdir / "launch.json", json.dumps(
        {"command": commands[trial.name], "overrides": _jsonable(trial.overrides),
         "git": revision}, indent=2))
  _write_atomic(root / EXPERIMENT_FILE, json.dumps(
      {"definition": _jsonable(experiment.definition()),
       "trials": {t.name: _jsonable(t.overrides) for t in experiment.trials},
       "git": revision}, indent=2))


def git_revision() -> dict[str, Any]:
  """{"commit": sha or None, "dirty": uncommitted changes to tracked files}."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False)
  head = git("rev-parse", "HEAD")
  if head.returncode:
    return {"commit": None, "dirty": None}
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def shell_join(args: list[str]) -> str:
  return " ".join(shlex.quote(a) for a in args)


def _parse_override(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise ValueError(f"--set {text!r} is not key=value")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def _flag_value(value: Any) -> str:
  return str(value) if isinstance(value, (str, int, float, bool)) else repr(value)


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=repr))


def _write_atomic(path: epath.Path, text: str) -> None:
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)
