"""The `local` executor: each trial as N processes on this machine, wired with `jax.distributed`
(coordinator on loopback), so the multi-host path runs for real without a pod.

Every process runs the experiment's program (`unires-train`, or `unires-demo`) on
`--local_devices` emulated CPU devices (other XLA_FLAGS of the environment pass through);
process i's output goes to `<trial>/logs/process_<i>.log` and, prefixed, to this terminal. A
trial fails as soon as one of its processes does (the others are stopped); the trials run one
after another.
"""

import os
import socket
import subprocess
import sys
import threading

from launch import experiment as experiment_lib
from launch import REPO_ROOT


def trial_commands(exp: experiment_lib.Experiment, trial: experiment_lib.Trial,
                   num_processes: int, port: int) -> list[list[str]]:
  """One command of the experiment's program per process."""
  return [[sys.executable, "-m", exp.module, f"--config={exp.config}",
           f"--workdir={exp.trial_dir(trial)}", f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}", "--progress=false",
           *trial.config_args()] for i in range(num_processes)]


def run(exp: experiment_lib.Experiment, *, num_processes: int, local_devices: int,
        dry_run: bool) -> None:
  """Runs (or prints) every trial; raises RuntimeError naming the first failed process."""
  if num_processes < 1 or local_devices < 1:
    raise ValueError(f"--num_processes={num_processes} and --local_devices={local_devices} "
                     "must be positive")
  xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": " ".join(xla_flags + [
             f"--xla_force_host_platform_device_count={local_devices}"]),
         "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
  commands = {t.name: trial_commands(exp, t, num_processes, _free_port()) for t in exp.trials}
  if dry_run:
    for name, cmds in commands.items():
      for i, cmd in enumerate(cmds):
        print(f"# trial {name}, process {i}\n{experiment_lib.shell_join(cmd)}")
    return
  experiment_lib.write_records(
      exp, {name: "\n".join(map(experiment_lib.shell_join, cmds))
            for name, cmds in commands.items()})
  for trial in exp.trials:
    _run_trial(trial.name, commands[trial.name], exp.trial_dir(trial), env)


def _run_trial(name: str, commands: list[list[str]], trial_dir: str, env: dict) -> None:
  log_dir = os.path.join(trial_dir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  print(f"[launch] trial {name}: {len(commands)} processes, logs in {log_dir}", flush=True)
  procs, pumps = [], []
  try:
    for i, cmd in enumerate(commands):
      proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace")
      log = os.path.join(log_dir, f"process_{i}.log")
      pump = threading.Thread(target=_pump, args=(proc.stdout, log, f"[{name}:{i}] "))
      pump.start()
      procs.append(proc)
      pumps.append(pump)
    failed = _wait_all(procs)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
    for pump in pumps:
      pump.join()
  if failed is not None:
    raise RuntimeError(f"trial {name}: process {failed} exited with status "
                       f"{procs[failed].returncode} (log: {log_dir}/process_{failed}.log)")


def _wait_all(procs: list[subprocess.Popen]) -> int | None:
  """Waits for every process; on the first failure stops the others and returns its index."""
  pending = set(range(len(procs)))
  while pending:
    for i in sorted(pending):
      try:
        code = procs[i].wait(timeout=1.0)
      except subprocess.TimeoutExpired:
        continue
      pending.discard(i)
      if code != 0:
        for j in pending:
          procs[j].terminate()
        return i
  return None


def _pump(stream, log_path: str, prefix: str) -> None:
  with open(log_path, "a", encoding="utf-8") as log:
    for line in stream:
      log.write(line)
      log.flush()
      sys.stdout.write(prefix + line)
      sys.stdout.flush()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
