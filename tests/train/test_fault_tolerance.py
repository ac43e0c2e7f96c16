"""Fault tolerance of `unires-train`: a run killed outright resumes and repeats the uninterrupted
run bit for bit; SIGTERM leaves a complete checkpoint at the current step, and a rerun goes on
from it, again bit for bit.

Every run is the real program (`python -m unires_jax.cli.train`) in a subprocess, on the tiny
model and the small ShapesParts dataset (`tests/train/shapes_config.py`), all with one config:
`NUM_STEPS` steps (the learning-rate schedule depends on it), so that every run's step s must
log the same scalars as the uninterrupted reference run's step s. The floats logged in
`metrics.jsonl` are compared with `==`: the same program on the same restored bits and the same
input order gives the same bits.

To keep the runtime down the runs use XLA flags that cut CPU compile time and share a persistent
compilation cache (the first run compiles, the others load its executables): the file takes
about 2.5-4 minutes on 2 busy CPU cores (5 runs; the first ~90 s, the others ~35 s each).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import xla

# One worker runs the whole module (--dist loadgroup), so its module fixture `reference` (the
# uninterrupted run) is set up once; with the tests spread over both workers each worker set it up.
pytestmark = pytest.mark.xdist_group("fault_tolerance")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS = 12
CHECKPOINT_EVERY = 2
KILL_AFTER_CHECKPOINT = 4  # SIGKILL once a complete checkpoint at a step >= this exists
TERM_AFTER_STEP = 3  # SIGTERM once metrics.jsonl shows a step >= this
RUN_TIMEOUT_S = 600  # one run; about 40-90 s on 2 busy CPU cores
RATE_KEYS = ("steps_per_second", "examples_per_second")  # timings: differ between runs
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax writes `<step>.orbax-checkpoint-tmp`, then renames


class Runner:
  """Starts `unires-train` runs of the test config in subprocesses, each logging to a file."""

  def __init__(self, root: str, cache_dir: str, logdir: str):
    self.root, self.logdir = root, logdir
    self.env = {
        **os.environ, "XLA_FLAGS": xla.FAST_COMPILE_FLAGS, "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    self.logs: dict[subprocess.Popen, str] = {}

  def start(self, workdir: str, name: str, *flags: str) -> subprocess.Popen:
    """Starts a run in `workdir`; its output goes to `<logdir>/<name>.log`."""
    cmd = [sys.executable, "-m", "unires_jax.cli.train",
           f"--config=tests/train/shapes_config.py:{self.root}", f"--workdir={workdir}",
           f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1",
           f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", "--progress=false", *flags]
    log = os.path.join(self.logdir, f"{name}.log")
    with open(log, "w", encoding="utf-8") as out:
      proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)
    self.logs[proc] = log
    return proc

  def run(self, workdir: str, name: str, *flags: str) -> str:
    """Runs to completion (exit code 0); returns its log's text."""
    proc = self.start(workdir, name, *flags)
    self.finish(proc, expect=0)
    return self.log_text(proc)

  def finish(self, proc: subprocess.Popen, expect: int) -> None:
    """Waits for `proc` (killing it on the timeout); fails unless it exits with `expect`."""
    try:
      proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      self.fail(proc, f"still running after {RUN_TIMEOUT_S} s")
    if proc.returncode != expect:
      self.fail(proc, f"exited with {proc.returncode}, expected {expect}")

  def wait_for(self, proc: subprocess.Popen, condition, what: str) -> None:
    """Polls `condition()` until true; fails if `proc` exits first or on the timeout."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
      if proc.poll() is not None:
        self.fail(proc, f"exited with {proc.returncode} before {what}")
      if time.monotonic() > deadline:
        self.fail(proc, f"no {what} after {RUN_TIMEOUT_S} s")
      time.sleep(0.05)

  def log_text(self, proc: subprocess.Popen) -> str:
    with open(self.logs[proc], encoding="utf-8", errors="replace") as f:
      return f.read()

  def fail(self, proc: subprocess.Popen, problem: str) -> None:
    """Ends `proc` if still running and fails the test with its output's last lines."""
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    tail = "".join(self.log_text(proc).splitlines(keepends=True)[-40:])
    pytest.fail(f"{problem}: {proc.args}\n----- last lines of {self.logs[proc]}:\n{tail}")


def step_records(workdir: str) -> list[dict]:
  """The training lines of `workdir/metrics.jsonl` (not the evaluation lines), in file order,
  without the timing rates."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    # A line still being written (the file is read while the run goes on) has no newline yet.
    records = [json.loads(line) for line in f if line.endswith("\n")]
  return [{k: v for k, v in r.items() if k not in RATE_KEYS} for r in records if "loss" in r]


def checkpoint_entries(workdir: str) -> tuple[list[int], list[str]]:
  """(steps of the complete checkpoints, sorted; names of anything else) in the checkpoint
  folder: a complete checkpoint is a folder named by its step alone."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  complete = sorted(int(n) for n in names if n.isdigit())
  return complete, sorted(n for n in names if not n.isdigit())


def assert_matches_reference(records: list[dict], reference: dict[int, dict], what: str) -> None:
  """Every record equals, bit for bit, the reference run's record of the same step."""
  for r in records:
    assert r["loss"] == reference[r["step"]]["loss"], (
        f"{what}, step {r['step']}: loss {r['loss']!r} != {reference[r['step']]['loss']!r}")
    assert r == reference[r["step"]], f"{what}, step {r['step']}: scalars differ"


@pytest.fixture(scope="module")
def runner(shapes_root, tmp_path_factory) -> Runner:
  """Runs on the session's ShapesParts data, sharing one compilation cache."""
  return Runner(shapes_root, str(tmp_path_factory.mktemp("compile_cache")),
                str(tmp_path_factory.mktemp("fault_tolerance_logs")))


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory) -> dict[int, dict]:
  """Run A: `NUM_STEPS` uninterrupted steps; its records by step."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  runner.run(workdir, "reference")
  records = step_records(workdir)
  assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
  return {r["step"]: r for r in records}


@pytest.mark.slow
def test_sigkill_then_resume_repeats_the_uninterrupted_run(runner, reference, tmp_path):
  """SIGKILL once a checkpoint at step >= 4 is complete; the rerun resumes from the newest
  complete checkpoint and logs exactly the uninterrupted run's losses for every later step."""
  workdir = str(tmp_path / "run")
  proc = runner.start(workdir, "killed")
  runner.wait_for(proc, lambda: any(s >= KILL_AFTER_CHECKPOINT for s in checkpoint_entries(
      workdir)[0]), f"a complete checkpoint at step >= {KILL_AFTER_CHECKPOINT}")
  proc.send_signal(signal.SIGKILL)
  runner.finish(proc, expect=-signal.SIGKILL)

  before = step_records(workdir)
  complete, others = checkpoint_entries(workdir)
  resume_step = complete[-1]
  print(f"killed after step {before[-1]['step']}; complete checkpoints {complete}, "
        f"other entries {others}")
  assert [r["step"] for r in before] == list(range(1, len(before) + 1))
  assert_matches_reference(before, reference, "killed run")
  assert resume_step % CHECKPOINT_EVERY == 0, complete
  assert KILL_AFTER_CHECKPOINT <= resume_step < NUM_STEPS, (
      f"killed too late to test a resume (checkpoints {complete}): raise NUM_STEPS")

  log = runner.run(workdir, "resumed")
  after = step_records(workdir)[len(before):]
  assert f"resumed from step {resume_step} " in log
  assert [r["step"] for r in after] == list(range(resume_step + 1, NUM_STEPS + 1))
  assert_matches_reference(after, reference, "resumed run")
  complete, others = checkpoint_entries(workdir)
  assert complete[-1] == NUM_STEPS and not others, (complete, others)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes_from_it(runner, reference, tmp_path):
  """SIGTERM after step 3 (checkpoints otherwise only every 1000 steps): the run exits with 0,
  leaving exactly one complete checkpoint, at the last step it logged; a rerun continues from
  that step and logs the uninterrupted run's losses."""
  workdir = str(tmp_path / "run")
  no_periodic = "--config.train.checkpoint_every=1000"  # only the preemption save can write one
  proc = runner.start(workdir, "terminated", no_periodic)
  runner.wait_for(proc, lambda: any(r["step"] >= TERM_AFTER_STEP for r in step_records(workdir)),
                  f"a logged step >= {TERM_AFTER_STEP}")
  proc.send_signal(signal.SIGTERM)
  runner.finish(proc, expect=0)

  before = step_records(workdir)
  stop_step = before[-1]["step"]
  assert stop_step < NUM_STEPS, "finished before SIGTERM took effect: raise NUM_STEPS"
  assert [r["step"] for r in before] == list(range(1, stop_step + 1))
  assert_matches_reference(before, reference, "terminated run")
  assert f"SIGTERM: saved a checkpoint at step {stop_step}," in runner.log_text(proc)
  assert checkpoint_entries(workdir) == ([stop_step], [])

  log = runner.run(workdir, "continued", no_periodic)
  after = step_records(workdir)[len(before):]
  assert f"resumed from step {stop_step} " in log
  assert [r["step"] for r in after] == list(range(stop_step + 1, NUM_STEPS + 1))
  assert_matches_reference(after, reference, "continued run")
