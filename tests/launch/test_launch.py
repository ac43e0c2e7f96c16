"""launch/launch.py: the tpu_vm dry run's exact commands, bad input refused before anything is
created, and the local executor running the demo config as two jax.distributed processes."""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from launch import experiment, tpu
from tests.repo import ROOT as REPO_ROOT


def _launch(*args, env=None, timeout=120):
  return subprocess.run([sys.executable, os.path.join("launch", "launch.py"), *args],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                        env=env, check=False)


def test_tpu_vm_dry_run_prints_every_command(tmp_path):
  workdir = str(tmp_path / "sweep1")
  run = _launch("--config=configs/unires_pp_7b.py", "--executor=tpu_vm", "--tpu=v5p-64",
                "--zone=us-east5-a", "--project=proj", f"--workdir={workdir}",
                "--sweep=" + 'product({"optimizer.learning_rate": [1e-4, 3e-5, 1e-5]})',
                "--set=train.num_steps=20000", "--set=train.seed=1", "--delete", "--dry_run")
  assert run.returncode == 0, run.stderr[-3000:]
  commit = experiment.git_revision()["commit"]
  archive = os.path.join(tempfile.gettempdir(), f"unires-jax-{commit[:12]}.tar.gz")
  where = "--project=proj --zone=us-east5-a"
  ssh = f"gcloud compute tpus tpu-vm ssh unires-sweep1 --worker=all {where}"
  trial = ("'--command=cd ~/unires-jax && python3 -m unires_jax.cli.train "
           f"--config=configs/unires_pp_7b.py --workdir={workdir}/{{name}} --distributed "
           "--num_processes=8 --progress=false --config.train.num_steps=20000 "
           "--config.train.seed=1 --config.optimizer.learning_rate={lr}'")
  expected = f"""[launch] 3 trial(s) of configs/unires_pp_7b.py in {workdir}
# create
gcloud compute tpus queued-resources create unires-sweep1-qr --node-id=unires-sweep1 {where} --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5
# wait
gcloud compute tpus queued-resources describe unires-sweep1-qr {where} '--format=value(state.state)'
# archive
git archive --format=tar.gz --output={archive} {commit}
# copy
gcloud compute tpus tpu-vm scp {archive} unires-sweep1:unires-jax.tar.gz --worker=all {where}
# install
{ssh} '--command=rm -rf ~/unires-jax && mkdir -p ~/unires-jax && tar -xzf unires-jax.tar.gz -C ~/unires-jax && python3 -m pip install -q -e ~/unires-jax "jax[tpu]"'
# trial 000
{ssh} {trial.format(name="000", lr="0.0001")}
# trial 001
{ssh} {trial.format(name="001", lr="3e-05")}
# trial 002
{ssh} {trial.format(name="002", lr="1e-05")}
# delete
gcloud compute tpus queued-resources delete unires-sweep1-qr {where} --force --quiet
"""
  assert run.stdout == expected
  assert not os.path.exists(workdir)  # a dry run writes nothing


def test_xm_dry_run_gives_the_same_trial_flags(tmp_path):
  workdir = str(tmp_path / "x")
  run = _launch("--config=configs/tiny.py", "--executor=xm", "--tpu=v5litepod-16",
                f"--workdir={workdir}", '--sweep={"train.seed": [0, 1]}', "--dry_run")
  assert run.returncode == 0, run.stderr[-3000:]
  for name, seed in (("000", 0), ("001", 1)):
    assert (f"# trial {name}: xm.Job(unires_jax.cli.train, Vertex, TPU_V5E=16 chips)\n"
            f"--config=configs/tiny.py --workdir={workdir}/{name} --distributed "
            f"--num_processes=4 --progress=false --config.train.seed={seed}\n") in run.stdout


@pytest.mark.parametrize("name, hosts", [("v5p-8", 1), ("v5p-64", 8), ("v4-32", 4),
                                         ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-256", 64)])
def test_tpu_types_know_their_hosts(name, hosts):
  assert tpu.parse(name).hosts == hosts


@pytest.mark.parametrize("name", ["v5p-63", "v5p", "v9-8", "v5e-8", "V5P-64", "v6e-512"])
def test_unknown_tpu_type_is_refused(name):
  with pytest.raises(ValueError, match=re.escape(f"unknown TPU type --tpu={name!r}")):
    tpu.parse(name)


def _refused(tmp_path, *args, message):
  workdir = tmp_path / "new"
  run = _launch("--config=configs/tiny.py", f"--workdir={workdir}", *args)
  assert run.returncode != 0
  assert message in run.stderr, run.stderr[-2000:]
  assert not workdir.exists()
  return run


def test_bad_input_is_refused_before_anything_is_created(tmp_path):
  tpu_args = ("--executor=tpu_vm", "--zone=z", "--project=p")
  _refused(tmp_path, *tpu_args, "--tpu=v5p-63", message="unknown TPU type --tpu='v5p-63'")
  _refused(tmp_path, *tpu_args, "--tpu=v5p-8", '--sweep={"optimizer.learning_rat": [1e-3]}',
           message="config key 'optimizer.learning_rat' is not in configs/tiny.py")
  _refused(tmp_path, "--set=train.num_steps=many", message="config key 'train.num_steps'")
  _refused(tmp_path, "--set=train=1", message="is a section")


def test_workdir_holding_another_experiment_is_refused(tmp_path):
  exp = experiment.make("configs/tiny.py", ["train.num_steps=5"], "", "local", str(tmp_path))
  experiment.write_records(exp, {"000": "unires-train ..."})
  record = json.loads((tmp_path / "000" / "launch.json").read_text())
  assert record["git"]["commit"] == experiment.git_revision()["commit"]
  assert json.loads((tmp_path / "000" / "config.json").read_text())["train"]["num_steps"] == 5
  experiment.check_workdir(exp)  # the same experiment again: it resumes
  other = experiment.make("configs/tiny.py", ["train.num_steps=6"], "", "local", str(tmp_path))
  with pytest.raises(ValueError, match="already holds another experiment .*overrides"):
    experiment.check_workdir(other)
  before = sorted(p.name for p in tmp_path.iterdir())
  run = _launch("--config=configs/tiny.py", f"--workdir={tmp_path}", "--set=train.num_steps=6")
  assert run.returncode != 0 and "already holds another experiment" in run.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == before


# The demo's tiny model one layer deep (as tests/train/shapes_config.py): what the launch shows
# (two processes, one run, the demo's outputs) does not depend on depth, and each process
# compiles its steps in about three quarters of the time.
ONE_LAYER = ("--set=model.vision.num_layers=2", "--set=model.llm.num_layers=1",
             "--set=model.convnext.depths=(1,1,1,1)", "--set=model.mask_decoder.num_layers=1")


@pytest.mark.slow
def test_local_executor_runs_the_demo_as_two_processes(tmp_path):
  workdir = tmp_path / "demo2"
  steps = 4
  run = _launch("--program=demo", "--config=configs/demo.py", "--executor=local",
                "--num_processes=2",
                f"--workdir={workdir}", f"--set=train.num_steps={steps}", "--set=train.log_every=1",
                "--set=optimizer.warmup_steps=1",
                "--set=demo.num_train=32", "--set=demo.num_val=8",
                "--set=evals.shapes_parts_val.batch_size=8", "--set=calibration.batch_size=8",
                "--set=demo.min_baseline_ratio=0.0", "--set=demo.min_n_acc=-1.0",
                *ONE_LAYER, timeout=1200)  # XLA_FLAGS of tests/conftest.py pass through
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
  finals = []
  for i in range(2):
    log = (workdir / "000" / "logs" / f"process_{i}.log").read_text()
    losses = re.findall(r"step (\d+): loss ([0-9.]+)", log)
    assert losses and int(losses[-1][0]) == steps, log[-2000:]
    finals.append(losses[-1][1])
    assert f"[000:{i}] " in run.stdout  # streamed here too
  assert finals[0] == finals[1]
  assert (workdir / "000" / "eval" / f"shapes_parts_val_{steps}.json").exists()
  assert str(steps) in os.listdir(workdir / "000" / "checkpoints")
  launched = json.loads((workdir / "000" / "launch.json").read_text())
  assert "--process_id=1" in launched["command"] and "--num_processes=2" in launched["command"]


def test_a_missing_flag_is_one_error_line_not_the_help(tmp_path):
  run = _refused(tmp_path, "--executor=tpu_vm", "--tpu=v5p-8", "--zone=z",
                 message="launch.py: error: --executor=tpu_vm needs --project")
  assert run.stderr.strip().splitlines() == [
      "launch.py: error: --executor=tpu_vm needs --project",
      "launch.py: see `launch.py --help` for the flags"]
