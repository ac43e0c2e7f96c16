"""The command-line programs share one set of flags: all of them import into one process, and a
usage error is one line and a pointer to --help."""

import subprocess
import sys

import pytest

from tests.repo import ROOT

PROGRAMS = ("convert", "demo", "eval", "propose", "segment", "serve", "summary", "train")


def test_every_program_imports_into_one_process():
  modules = ", ".join(f"unires_jax.cli.{p}" for p in PROGRAMS)
  code = f"import {modules}; from absl import flags; print(flags.FLAGS['checkpoint'].help)"
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       check=False)
  assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("program, args, error", [
    ("train", ["--config=configs/tiny.py"], "--workdir is required"),
    ("eval", [], "--workdir is required"),
    ("convert", ["to-pytorch", "--out=/nonexistent/x"], "to-pytorch needs --checkpoint"),
    ("segment", [], "--checkpoint is required"),
    ("serve", [], "--checkpoint is required"),
    ("serve", ["--checkpoint=/nonexistent/run"], "--checkpoint=/nonexistent/run: no checkpoint "
     "in /nonexistent/run: expected a converted checkpoint (params/ and config.json), a training "
     "work directory or its checkpoints/ directory"),
    ("serve", ["--checkpoint=/nonexistent/run", "--max_pixels=0"], "--max_pixels=0 must be "
     "positive"),
    ("serve", ["--checkpoint=/nonexistent/run", "--no_target_threshold=1.5"],
     "--no_target_threshold=1.5 must be in (0, 1)"),
])
def test_a_usage_error_is_one_line(program, args, error):
  run = subprocess.run([sys.executable, "-m", f"unires_jax.cli.{program}", *args],
                       capture_output=True, text=True, cwd=ROOT, check=False)
  assert run.returncode == 1
  lines = [l for l in run.stderr.splitlines() if ": error: " in l or "--help" in l]
  assert len(lines) == 2 and lines[0].endswith(f": error: {error}"), run.stderr[-2000:]
  assert "USAGE" not in run.stderr and "flags:" not in run.stderr  # no help text


def test_an_unknown_config_names_the_installed_ones(tmp_path):
  run = subprocess.run([sys.executable, "-m", "unires_jax.cli.summary", "--config=configs/x.py"],
                       capture_output=True, text=True, cwd=tmp_path, check=False)
  assert run.returncode != 0
  assert "config file 'configs/x.py' not found" in run.stderr
  assert "['demo', 'tiny', 'unires_pp_7b']" in run.stderr
