"""The `xm` executor: the same experiment through the open-source XManager API
(`pip install -e '.[xm]'`), one Vertex AI job per trial on a TPU slice.

XManager packages the repository as a container (`xm.python_container`) and runs
the experiment's program (`unires_jax.cli.train` or `.demo`) with each trial's flags, the
same flags the `tpu_vm` executor passes.
"""

from launch import experiment as experiment_lib
from launch import tpu as tpu_lib
from launch import REPO_ROOT

# launch.tpu family -> xm.ResourceType name, and how many of the size units make a chip.
RESOURCES = {"v4": ("TPU_V4", 2), "v5p": ("TPU_V5P", 2), "v5litepod": ("TPU_V5E", 1),
             "v6e": ("TPU_V6E", 1)}


def _xmanager():
  try:
    from xmanager import xm, xm_local  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise RuntimeError("--executor=xm needs the xmanager package: pip install -e '.[xm]'") from None
  return xm, xm_local


def run(exp: experiment_lib.Experiment, tpu: tpu_lib.TpuType, *, dry_run: bool) -> None:
  """Adds one job per trial to a new XManager experiment (prints them with `dry_run`)."""
  resource, units_per_chip = RESOURCES[tpu.family]
  if dry_run:
    for trial in exp.trials:
      print(f"# trial {trial.name}: xm.Job({exp.module}, Vertex, "
            f"{resource}={tpu.size // units_per_chip} chips)\n"
            f"{experiment_lib.shell_join(exp.pod_train_flags(trial, tpu.hosts))}")
    return
  xm, xm_local = _xmanager()
  experiment_lib.write_records(exp, {
      t.name: experiment_lib.shell_join(exp.pod_train_flags(t, tpu.hosts)) for t in exp.trials})
  requirements = xm.JobRequirements(
      {getattr(xm.ResourceType, resource): tpu.size // units_per_chip})
  with xm_local.create_experiment(experiment_title=exp.workdir) as experiment:
    [executable] = experiment.package([xm.python_container(
        executor_spec=xm_local.Vertex.Spec(), path=REPO_ROOT,
        entrypoint=xm.ModuleName(exp.module))])
    for trial in exp.trials:
      experiment.add(xm.Job(executable, xm_local.Vertex(requirements=requirements),
                            name=f"trial-{trial.name}", args=exp.pod_train_flags(trial, tpu.hosts)))
