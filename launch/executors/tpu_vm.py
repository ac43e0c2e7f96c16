"""The `tpu_vm` executor: a Cloud TPU slice through `gcloud`, with the trials run on every worker.

For an experiment it runs, in order (or prints, with `--dry_run`):

  1. `gcloud compute tpus queued-resources create` for the slice, then `describe` until ACTIVE;
  2. `git archive` of the checked-out commit, `tpu-vm scp --worker=all` of the archive;
  3. `tpu-vm ssh --worker=all`: unpack it and `pip install` it with `jax[tpu]` on every worker;
  4. per trial, `tpu-vm ssh --worker=all`: `unires-train` with the trial's overrides on every
     worker at once, the output of all workers streamed here; the processes find each other
     through `jax.distributed.initialize()` (`--distributed`, the TPU metadata gives the
     coordinator and process ids) and check that there are `--num_processes` of them;
  5. with `--delete`, `queued-resources delete` when the trials are done (or one failed).
"""

import dataclasses
import subprocess
import sys
import time

from launch import experiment as experiment_lib
from launch import tpu as tpu_lib

REMOTE_DIR = "~/unires-jax"
ARCHIVE = "unires-jax.tar.gz"
POLL_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class Slice:
  tpu: tpu_lib.TpuType
  name: str  # the TPU node id; the queued resource is `<name>-qr`
  zone: str
  project: str
  runtime_version: str
  spot: bool = False

  @property
  def location(self) -> list[str]:
    return [f"--project={self.project}", f"--zone={self.zone}"]


def create_command(s: Slice) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "create", f"{s.name}-qr",
          f"--node-id={s.name}", *s.location, f"--accelerator-type={s.tpu.name}",
          f"--runtime-version={s.runtime_version}", *(["--spot"] if s.spot else [])]


def state_command(s: Slice) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{s.name}-qr",
          *s.location, "--format=value(state.state)"]


def delete_command(s: Slice) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", f"{s.name}-qr",
          *s.location, "--force", "--quiet"]


def archive_command(commit: str, path: str) -> list[str]:
  return ["git", "archive", "--format=tar.gz", f"--output={path}", commit]


def scp_command(s: Slice, path: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", path, f"{s.name}:{ARCHIVE}",
          "--worker=all", *s.location]


def ssh_command(s: Slice, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", s.name, "--worker=all", *s.location,
          f"--command={remote}"]


def install_remote() -> str:
  return (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR} "
          f'&& python3 -m pip install -q -e {REMOTE_DIR} "jax[tpu]"')


def trial_remote(exp: experiment_lib.Experiment, trial: experiment_lib.Trial,
                 hosts: int) -> str:
  """The command every worker runs for `trial`."""
  args = ["python3", "-m", exp.module, *exp.pod_train_flags(trial, hosts)]
  return f"cd {REMOTE_DIR} && {experiment_lib.shell_join(args)}"


def plan(exp: experiment_lib.Experiment, s: Slice, commit: str,
         archive_path: str) -> list[tuple[str, list[str]]]:
  """(what, command) in the order they run; "trial <name>" for the trials."""
  steps = [("create", create_command(s)), ("wait", state_command(s)),
           ("archive", archive_command(commit, archive_path)),
           ("copy", scp_command(s, archive_path)), ("install", ssh_command(s, install_remote()))]
  steps += [(f"trial {t.name}", ssh_command(s, trial_remote(exp, t, s.tpu.hosts)))
            for t in exp.trials]
  return steps


def run(exp: experiment_lib.Experiment, s: Slice, *, commit: str, archive_path: str,
        delete: bool, dry_run: bool, wait_timeout_s: float = 3 * 3600) -> None:
  """Runs (or prints) the plan; `delete` removes the slice at the end, also after a failure."""
  steps = plan(exp, s, commit, archive_path)
  if dry_run:
    for what, cmd in steps + ([("delete", delete_command(s))] if delete else []):
      print(f"# {what}\n{experiment_lib.shell_join(cmd)}")
    return
  experiment_lib.write_records(
      exp, {t.name: trial_remote(exp, t, s.tpu.hosts) for t in exp.trials})
  try:
    for what, cmd in steps:
      print(f"[launch] {what}: {experiment_lib.shell_join(cmd)}", flush=True)
      if what == "wait":
        _wait_active(cmd, wait_timeout_s)
      else:
        subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
  finally:
    if delete:
      subprocess.run(delete_command(s), check=False)


def _wait_active(cmd: list[str], timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while True:
    state = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise RuntimeError(f"the queued resource is {state}")
    if time.monotonic() > deadline:
      raise TimeoutError(f"the queued resource is still {state!r} after {timeout_s:.0f} s")
    print(f"[launch] slice {state or 'not yet listed'}; waiting", flush=True)
    time.sleep(POLL_SECONDS)
