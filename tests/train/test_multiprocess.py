"""Two processes on localhost (`jax.distributed`, CPU, gloo) train the tiny model for 3 steps
and agree.

Each process runs `unires-train` (through `multiprocess_driver`, which records what the process
saw) with 2 CPU devices: one global mesh of 4 devices, data=4, each process feeding its own
half of every global batch from its own share of the images. Both write one checkpoint folder
(Orbax coordinates them) and evaluate the val split together (each its own half of the images,
the metric sums added over processes).

Agreement: the processes read bit-identical losses and scalars for every step and end with
bit-identical parameters, which equal those of the step-3 checkpoint restored here; their
batches were disjoint (so the equality comes from the collectives, not from equal inputs);
both got the same evaluation result, which counts every val expression exactly once.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import xla
from tests.train import multiprocess_driver
from unires_jax import checkpoint, parallel
from unires_jax.config_lib import load_config
from unires_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_PROCESSES, LOCAL_DEVICES, NUM_STEPS = 2, 2, 3
GLOBAL_BATCH = 8  # tests/train/shapes_config.py
TIMEOUT_S = 900  # the whole run; it takes a few minutes on 2 busy CPU cores
# Compile time dominates on CPU: the tests' fast-compile flags (both processes use the same
# flags, so the comparison is unaffected).
XLA_FLAGS = f"--xla_force_host_platform_device_count={LOCAL_DEVICES} {xla.FAST_COMPILE_FLAGS}"
TRAIN_FLAGS = (f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=3",
               "--config.train.log_every=1", "--config.optimizer.warmup_steps=1",
               "--config.evals.shapes_parts_val.batch_size=8", "--progress=false")
HEADLINE_KEYS = ("mIoU", "cIoU", "gIoU", "N-acc", "T-acc", "count")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tail(path: str, lines: int = 40) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    kept = [line for line in f if "[Gloo]" not in line]
  return "".join(kept[-lines:])


def _launch(root: str, workdir: str, logdir: str) -> list[tuple[subprocess.Popen, str]]:
  """Starts the processes; returns (process, log path) for each."""
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
  procs = []
  for i in range(NUM_PROCESSES):
    cmd = [sys.executable, "-m", "tests.train.multiprocess_driver",
           f"--config=tests/train/shapes_config.py:{root}", f"--workdir={workdir}",
           f"--coordinator_address=localhost:{port}", f"--num_processes={NUM_PROCESSES}",
           f"--process_id={i}", *TRAIN_FLAGS]
    log = os.path.join(logdir, f"process_{i}.log")
    with open(log, "w", encoding="utf-8") as out:
      procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                     stderr=subprocess.STDOUT), log))
  return procs


def _wait_all(procs: list[tuple[subprocess.Popen, str]]) -> None:
  """Waits for every process (killing all on the deadline); fails with their logs' tails
  unless all exit with 0. One process failing leaves the other stuck in a collective, so a
  failure ends the others too."""
  deadline = time.monotonic() + TIMEOUT_S
  problem = None
  while problem is None and any(p.poll() is None for p, _ in procs):
    failed = [i for i, (p, _) in enumerate(procs) if p.poll() not in (None, 0)]
    if failed:
      problem = f"process {failed[0]} exited with {procs[failed[0]][0].returncode}"
    elif time.monotonic() > deadline:
      problem = f"timed out after {TIMEOUT_S} s"
    else:
      time.sleep(1)
  for p, _ in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  codes = [p.returncode for p, _ in procs]
  if problem is None and any(codes):
    problem = f"exit codes {codes}"
  if problem is not None:
    logs = "\n".join(f"----- process {i} ({log}), last lines:\n{_tail(log)}"
                     for i, (_, log) in enumerate(procs))
    pytest.fail(f"multi-process training failed: {problem}\n{logs}")


def _read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _restored_digest(root: str, workdir: str) -> str:
  """The parameters of the step-3 checkpoint, restored here on this process's own mesh."""
  config = load_config(f"tests/train/shapes_config.py:{root}")
  config.train.num_steps = NUM_STEPS
  config.optimizer.warmup_steps = 1
  model = parallel.ShardedModel(config, parallel.make_mesh(config.mesh))
  params, step = checkpoint.restore_params(os.path.join(workdir, "checkpoints"),
                                           model.abstract_sharded(), step=NUM_STEPS)
  assert step == NUM_STEPS
  return multiprocess_driver.param_digest(params)


def _val_expressions(root: str) -> int:
  source = pipeline.open_source("ref_coco_m", "val", os.path.join(root, "tfds"))
  return sum(len(source[i]["expressions"]["id"]) for i in range(len(source)))


def _check_records(records: list[dict]) -> None:
  first = records[0]
  steps = [str(s) for s in range(1, NUM_STEPS + 1)]
  for i, r in enumerate(records):
    assert (r["process_index"], r["process_count"]) == (i, NUM_PROCESSES)
    assert (r["device_count"], r["local_device_count"]) == (NUM_PROCESSES * LOCAL_DEVICES,
                                                            LOCAL_DEVICES)
    assert r["final_step"] == NUM_STEPS
    assert sorted(r["losses"], key=int) == steps, r["losses"]
    assert all(math.isfinite(v) for v in r["losses"].values()), r["losses"]
    assert all(s["finite"] == 1.0 for s in r["scalars"]), r["scalars"]
    # Bit-identical: floats read back from JSON compare exactly.
    assert r["losses"] == first["losses"], f"process {i} losses differ from process 0's"
    assert r["scalars"] == first["scalars"], f"process {i} scalars differ from process 0's"
    assert r["param_digest"] == first["param_digest"], f"process {i} ends with other params"
    np.testing.assert_equal(r["eval_metrics"], first["eval_metrics"])
  # Each process fed its own half of each global batch: the halves share no expression.
  for step in range(NUM_STEPS):
    halves = [r["expression_ids"][step] for r in records]
    assert all(len(h) == GLOBAL_BATCH // NUM_PROCESSES for h in halves), halves
    assert not set(halves[0]) & set(halves[1]), f"step {step + 1}: processes fed equal rows"


@pytest.mark.slow
def test_two_processes_train_and_agree(shapes_root, tmp_path):
  workdir = str(tmp_path / "run")
  _wait_all(_launch(shapes_root, workdir, str(tmp_path)))

  records = [_read_json(os.path.join(workdir, f"process_{i}.json"))
             for i in range(NUM_PROCESSES)]
  _check_records(records)

  # Process 0's metric log holds the same losses.
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  assert {str(r["step"]): r["loss"] for r in logged if "loss" in r} == records[0]["losses"]

  # The step-3 checkpoint is complete (no temporary folder is left: Orbax renames a step's
  # folder once every process has written its part), restores, and holds the parameters both
  # processes ended with.
  entries = os.listdir(os.path.join(workdir, "checkpoints"))
  assert str(NUM_STEPS) in entries and all(e.isdigit() for e in entries), entries
  assert _restored_digest(shapes_root, workdir) == records[0]["param_digest"]

  evaluation = _read_json(os.path.join(workdir, "eval", f"shapes_parts_val_{NUM_STEPS}.json"))
  assert (evaluation["dataset"], evaluation["split"], evaluation["step"]) == (
      "ref_coco_m", "val", NUM_STEPS)
  assert set(HEADLINE_KEYS) <= set(evaluation["metrics"]), sorted(evaluation["metrics"])
  assert evaluation["metrics"]["count"] == _val_expressions(shapes_root)
  np.testing.assert_equal(evaluation["metrics"], records[0]["eval_metrics"]["shapes_parts_val"])
