"""Launches an experiment: a config, overrides, a sweep, on an executor.

  python launch/launch.py --config=configs/unires_pp_7b.py:slice=v5p-32 --tpu=v5p-32 \\
      --executor=tpu_vm --zone=us-east5-a --project=my-project --workdir=gs://bucket/exp1 \\
      --sweep='product({"optimizer.learning_rate": [1e-4, 3e-5]}, {"train.seed": [0, 1]})' \\
      [--set=train.num_steps=20000 ...] [--delete] [--dry_run]

  python launch/launch.py --program=demo --config=configs/demo.py --executor=local \\
      --num_processes=2 --workdir=/tmp/demo2 --set=train.num_steps=100

Everything is checked before anything is created: the TPU type, every swept or set key against
the config (and its value's type), and that the work directory holds no other experiment.
Executors: launch/executors/{local,tpu_vm,xm}.py; sweeps: launch/sweep.py; the records written
next to each trial's checkpoints: launch/experiment.py.
"""

import os
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: import `launch` from the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position

from launch import experiment as experiment_lib  # pylint: disable=wrong-import-position
from launch import tpu as tpu_lib  # pylint: disable=wrong-import-position
from launch.executors import local, tpu_vm, xm  # pylint: disable=wrong-import-position
from unires_jax import utils  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file, configs/x.py[:arg].")
flags.DEFINE_multi_string("set", [], "key=value: a config override for every trial.")
flags.DEFINE_string("sweep", "", "A launch/sweep.py expression; empty = one trial.")
flags.DEFINE_enum("executor", "local", ["local", "tpu_vm", "xm"], "Where the trials run.")
flags.DEFINE_enum("program", "train", list(experiment_lib.PROGRAMS),
                  "What each trial runs: unires-train, or unires-demo (its own data first).")
flags.DEFINE_string("workdir", None, "Experiment directory (local path or gs://...).")
flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")
# local
flags.DEFINE_integer("num_processes", 2, "local: processes per trial (jax.distributed).")
flags.DEFINE_integer("local_devices", 1, "local: emulated CPU devices per process.")
# tpu_vm / xm
flags.DEFINE_string("tpu", None, "tpu_vm, xm: slice type, e.g. v5p-64, v5litepod-16, v6e-8.")
flags.DEFINE_string("zone", None, "tpu_vm: e.g. us-east5-a.")
flags.DEFINE_string("project", None, "tpu_vm: Google Cloud project.")
flags.DEFINE_string("name", None, "tpu_vm: TPU node name (default: from the workdir).")
flags.DEFINE_string("runtime_version", None, "tpu_vm: TPU VM image (default: the family's).")
flags.DEFINE_bool("spot", False, "tpu_vm: a Spot slice.")
flags.DEFINE_bool("delete", False, "tpu_vm: delete the slice when the trials end.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  for name in ("config", "workdir"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  tpu = None
  if FLAGS.executor in ("tpu_vm", "xm"):
    if not FLAGS.tpu:
      raise app.UsageError(f"--executor={FLAGS.executor} needs --tpu")
    tpu = tpu_lib.parse(FLAGS.tpu)
  if FLAGS.executor == "tpu_vm":
    missing = [f for f in ("zone", "project") if not getattr(FLAGS, f)]
    if missing:
      raise app.UsageError(f"--executor=tpu_vm needs --{missing[0]}")
  if FLAGS.executor == "local" and "://" in FLAGS.workdir:
    raise app.UsageError(f"--executor=local needs a local --workdir, got {FLAGS.workdir}")
  exp = experiment_lib.make(FLAGS.config, FLAGS.set, FLAGS.sweep, FLAGS.executor, FLAGS.workdir,
                            FLAGS.program)
  try:
    experiment_lib.check_workdir(exp)
  except OSError as e:  # storage out of reach: a dry run still shows what it would do
    if not FLAGS.dry_run:
      raise
    print(f"# --workdir={exp.workdir} not checked: {e}".splitlines()[0])
  print(f"[launch] {len(exp.trials)} trial(s) of {exp.config} in {exp.workdir}", flush=True)
  if FLAGS.executor == "local":
    local.run(exp, num_processes=FLAGS.num_processes, local_devices=FLAGS.local_devices,
              dry_run=FLAGS.dry_run)
  elif FLAGS.executor == "tpu_vm":
    revision = experiment_lib.git_revision()
    commit = revision["commit"] or "HEAD"
    if revision["dirty"]:
      print(f"warning: uncommitted changes stay here; the workers get commit {commit}",
            file=sys.stderr)
    slice_ = tpu_vm.Slice(tpu, FLAGS.name or node_name(exp.workdir), FLAGS.zone, FLAGS.project,
                          FLAGS.runtime_version or tpu.runtime_version, FLAGS.spot)
    archive = os.path.join(tempfile.gettempdir(), f"unires-jax-{commit[:12]}.tar.gz")
    tpu_vm.run(exp, slice_, commit=commit, archive_path=archive, delete=FLAGS.delete,
               dry_run=FLAGS.dry_run)
  else:
    xm.run(exp, tpu, dry_run=FLAGS.dry_run)


def node_name(workdir: str) -> str:
  """A TPU node name from the workdir's last component: lower case, digits and dashes."""
  base = workdir.rstrip("/").rsplit("/", 1)[-1].lower()
  cleaned = "".join(c if c.isalnum() else "-" for c in base).strip("-")
  return f"unires-{cleaned}"[:40].rstrip("-")


def run() -> None:
  app.run(utils.brief_usage_errors(main))


if __name__ == "__main__":
  run()
