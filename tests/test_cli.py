"""The command-line programs share one set of flags (all of them import into one process), and end
alike (`unires_jax.cli.common.run`): a user's mistake is one line `<command>: error: <message>`
and exit status 2, a bug its traceback.

Most run in this process (`tests.cli_runner.run_cli`), their flags parsed from `sys.argv` as the
console script parses them; the console scripts themselves run for --help and a few checks."""

import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

from tests.cli_runner import one_error_line, run_cli  # pylint: disable=unused-import
from tests.repo import ROOT
from unires_jax import config_lib

PROGRAMS = ("convert", "data", "demo", "eval", "propose", "segment", "serve", "summary", "train")


def test_every_program_imports_into_one_process():
  modules = ", ".join(f"unires_jax.cli.{p}" for p in PROGRAMS)
  code = f"import {modules}; from absl import flags; print(flags.FLAGS['checkpoint'].help)"
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       check=False)
  assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
  """A directory `checkpoint.locate` takes for a converted checkpoint of the tiny config (its
  parameters are never read here)."""
  root = tmp_path_factory.mktemp("converted")
  (root / "params").mkdir()
  config_lib.write_config_json(config_lib.load_config("tiny"), str(root))
  return str(root)


SAVE_PRETRAINED = ("; give a directory saved by transformers' save_pretrained "
                   "(Owlv2ForObjectDetection and its Owlv2Processor, e.g. of "
                   "google/owlv2-base-patch16-ensemble): nothing is downloaded")


# One wrong input of each kind, on every program: a missing path, a missing config setting, an
# existing output, a bad --config override or config file, an unknown flag or a bad flag value,
# a bad checkpoint, a bad detector directory.
@pytest.mark.parametrize("program, args, error", [
    ("eval", ["--workdir={tmp}/missing"], "no checkpoint in {tmp}/missing: expected a converted "
     "checkpoint (params/ and config.json), a training work directory or its checkpoints/ "
     "directory"),
    ("eval", ["--workdir={tmp}", "--step=last"], "flag --step=last: invalid literal for int() "
     "with base 10: 'last' (`unires-eval --help` lists the flags)"),
    ("eval", ["--workdir={converted}", "--no_target_threshold=1.5"],
     "--no_target_threshold=1.5 must be in (0, 1)"),
    ("demo", ["--workdir={tmp}/demo", "--config.demo.without=door,boat"],
     "config.demo.without='door,boat': without: ['boat'] are neither kinds ['truck', 'person', "
     "'house', 'tree'] nor parts ['cargo box', 'cabin', 'wheels', 'body', 'head', 'legs', "
     "'walls', 'roof', 'door', 'crown', 'trunk']"),
    ("train", ["--config=configs/tiny.py", "--workdir={tmp}/run"], "no tokenizer directory "
     "given: set config.input.tokenizer to a directory written by save_pretrained (nothing is "
     "downloaded)"),
    ("train", ["--config=configs/tiny.py", "--workdir={tmp}/run",
               "--config.optimizer.learning_rat=1"],
     "--config.optimizer.learning_rat: configs/tiny.py has no field optimizer.learning_rat; "
     "the closest is optimizer.learning_rate"),
    ("convert", ["to-pytorch", "--checkpoint={converted}", "--out={tmp}"],
     "--out={tmp} already exists; choose a new output directory"),
    ("summary", ["--config.modle.llm.num_layers=1"], "--config.modle.llm.num_layers: "
     "configs/unires_pp_7b.py has no field modle; the closest is model"),
    ("summary", ["--config=tiny:layers=2"], "flag --config=tiny:layers=2: unknown config "
     "argument 'layers' in 'layers=2'; this config takes no argument (`unires-summary --help` "
     "lists the flags)"),
    ("summary", ["--wrkdir=x"], "Unknown command line flag 'wrkdir'. Did you mean: workdir ? "
     "(`unires-summary --help` lists the flags)"),
    ("demo", ["--config=configs/x.py"], "flag --config=configs/x.py: config file "
     "'configs/x.py' not found from {cwd}, and it names no installed config (configs/NAME.py "
     "with NAME in ['demo', 'demo_finetune', 'tiny', 'unires_pp_7b']) (`unires-demo --help` "
     "lists the flags)"),
    ("segment", ["--checkpoint={tmp}", "--image={tmp}/a.png", "--text=x", "--out={tmp}/m.png"],
     "no checkpoint in {tmp}: expected a converted checkpoint (params/ and config.json), a "
     "training work directory or its checkpoints/ directory"),
    ("segment", ["--checkpoint={converted}", "--image={tmp}/missing.png", "--text=x",
                 "--out={tmp}/m.png"], "--image: image {tmp}/missing.png not found"),
    ("serve", ["--checkpoint={converted}", "--detector={tmp}"],
     "--detector={tmp}: no config.json in it" + SAVE_PRETRAINED),
    ("propose", ["--detector={tmp}", "--manual_dir={tmp}", "--split=val"],
     "--detector={tmp}: no config.json in it" + SAVE_PRETRAINED),
])
def test_a_users_mistake_is_one_line_and_status_2(run_cli, converted, tmp_path, monkeypatch,
                                                   program, args, error):
  fill = {"{tmp}": str(tmp_path), "{converted}": converted, "{cwd}": str(tmp_path)}
  for key, value in fill.items():
    args = [a.replace(key, value) for a in args]
    error = error.replace(key, value)
  monkeypatch.chdir(tmp_path)  # configs/x.py is not found from here
  status, _, err = run_cli(program, *args)
  assert status == 2
  assert one_error_line(program, err) == error


@pytest.mark.parametrize("program, args", [
    ("propose", ["--manual_dir={tmp}", "--split=val"]),
    ("segment", ["--checkpoint={converted}", "--image={image}", "--text=x", "--out={tmp}/m.png"]),
    ("serve", ["--checkpoint={converted}"]),
])
@pytest.mark.parametrize("detector, error", [
    ("owlv2-base-patch16-ensemble", "no such directory"),  # a hub name, as the docs once had it
    ("{tmp}/no_tokenizer", "no tokenizer (tokenizer.json or vocab.json) in it"),
])
def test_a_wrong_detector_is_named_in_one_line(run_cli, converted, tmp_path, monkeypatch,
                                                program, args, detector, error):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "no_tokenizer").mkdir()
  (tmp_path / "no_tokenizer" / "config.json").write_text("{}")
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  fill = {"{tmp}": str(tmp_path), "{converted}": converted, "{image}": str(tmp_path / "a.png")}
  for key, value in fill.items():
    args = [a.replace(key, value) for a in args]
    detector = detector.replace(key, value)
  status, _, err = run_cli(program, f"--detector={detector}", *args)
  assert status == 2
  assert one_error_line(program, err) == f"--detector={detector}: {error}{SAVE_PRETRAINED}"


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
    ("propose", ["--detector=d", "--manual_dir=m", "--split=val", "--builder_config=x"],
     "--builder_config names ref_coco's refs file (e.g. refcoco_unc); give it with "
     "--dataset=ref_coco and only then"),
])
def test_a_usage_error_is_one_line(run_cli, program, args, error):
  status, _, err = run_cli(program, *args)
  assert status == 2
  assert one_error_line(program, err) == error
  assert "USAGE" not in err and "flags:" not in err  # no help text


def test_a_bug_keeps_its_traceback(run_cli, monkeypatch):
  from unires_jax.models import summary  # pylint: disable=g-import-not-at-top

  def broken(table):  # a ValueError NumPy raises is a bug, not a user's mistake
    del table
    return np.zeros(2) + np.zeros(3)

  monkeypatch.setattr(summary, "format_table", broken)
  with pytest.raises(ValueError, match="could not be broadcast"):
    run_cli("summary", "--config=tiny")


def test_unires_traceback_shows_a_users_mistake_with_its_traceback(run_cli, tmp_path,
                                                                    monkeypatch):
  monkeypatch.setenv("UNIRES_TRACEBACK", "1")
  status, _, err = run_cli("eval", f"--workdir={tmp_path}/missing")
  assert status == 2
  assert err.startswith("Traceback (most recent call last):")
  assert "\nFileNotFoundError: no checkpoint in " in err
  assert err.strip().splitlines()[-1].startswith(
      f"unires-eval: error: no checkpoint in {tmp_path}/missing")


def test_the_console_script_prints_one_line(tmp_path):
  """The installed `unires-eval`, as a user runs it: nothing on stderr but the line."""
  script = os.path.join(os.path.dirname(sys.executable), "unires-eval")
  run = subprocess.run([script, f"--workdir={tmp_path}/missing"], capture_output=True, text=True,
                       cwd=tmp_path, check=False)
  assert run.returncode == 2
  assert run.stderr.splitlines() == [f"unires-eval: error: no checkpoint in {tmp_path}/missing: "
                                     "expected a converted checkpoint (params/ and config.json), "
                                     "a training work directory or its checkpoints/ directory"]


# The flags of `unires_jax.cli.common` each program reads (its own module's come on top).
SHARED_FLAGS = {
    "convert": {"config", "checkpoint", "step", "out", "quantize"},
    "data": {"manual_dir", "out"},
    "demo": {"workdir", "config", "progress"},
    "eval": {"workdir", "step", "config", "quantize", "no_target_threshold"},
    "propose": {"detector", "manual_dir", "config", "progress"},
    "segment": {"checkpoint", "step", "out", "detector", "batch_size", "no_target_threshold",
                "quantize"},
    "serve": {"checkpoint", "step", "detector", "batch_size", "no_target_threshold", "quantize"},
    "summary": {"config"},
    "train": {"config", "workdir", "progress"},
}
MULTI_HOST_FLAGS = {"distributed", "coordinator_address", "num_processes", "process_id"}


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
  """`unires-<program> --help` of every installed console script, run side by side."""
  bin_dir = os.path.dirname(sys.executable)
  cwd = tmp_path_factory.mktemp("help")
  runs = {p: subprocess.Popen([os.path.join(bin_dir, f"unires-{p}"), "--help"], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for p in PROGRAMS}
  out = {}
  for program, run in runs.items():
    stdout, stderr = run.communicate(timeout=120)
    out[program] = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
  return out


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_lists_the_programs_own_flags(helps, program):
  module = importlib.import_module(f"unires_jax.cli.{program}")
  run = helps[program]
  assert run.returncode == 0, run.stderr[-3000:]
  text = run.stdout
  assert text.startswith(f"unires-{program}: "), text[:300]  # what the program does, one line
  own = {f.name for f in flags.FLAGS.get_flags_for_module(module.__name__)}
  expected = own | SHARED_FLAGS[program] | MULTI_HOST_FLAGS
  listed = re.findall(r"^  --(?:\[no\])?(\w+): ", text, flags=re.MULTILINE)
  assert sorted(listed) == sorted(expected)  # each once; absl's only with --helpfull
  flat = " ".join(text.split())
  for name in expected:
    assert " ".join(flags.FLAGS[name].help.split())[:60] in flat, name
  assert re.search(r"^multi-host:$", text, flags=re.MULTILINE)
  if "config" in expected:
    assert "--config.a.b=value overrides any field" in flat
  assert "--helpfull" in flat and "UNIRES_TRACEBACK=1" in flat


def test_help_groups_the_flags_and_shows_defaults(helps):
  from unires_jax.cli import segment  # pylint: disable=g-import-not-at-top

  text = helps["segment"].stdout
  doc = segment.__doc__.strip()
  assert text.startswith(doc + "\n")  # the program's manual first
  groups = re.findall(r"^(\S[^:\n]*):$", text[len(doc):], flags=re.MULTILINE)
  assert groups == ["model", "one image", "a batch", "proposals", "multi-host"]
  assert "  --batch_size: Rows per model call" in text and "(default: 8)" in text
  assert "(default: configs/unires_pp_7b.py)" in helps["propose"].stdout


def test_the_programs_flags_are_absl_key_flags_of_the_main_module(run_cli):
  status, out, _ = run_cli("propose", "--help")
  assert status == 0 and out.startswith("unires-propose: ")
  key = {f.name for f in flags.FLAGS.get_key_flags_for_module("unires-propose")}
  assert {"detector", "manual_dir", "split", "config", "distributed"} <= key


@pytest.mark.parametrize("environ, platforms, tpu_chips, nvidia_gpu, plugins, cpu", [
    ({}, None, 0, False, False, True),  # a CPU host: no libtpu probe
    ({}, None, 4, False, False, False),  # a TPU VM keeps its TPU
    ({}, None, 0, True, False, False),  # a GPU host: JAX's choice
    ({}, None, 0, False, True, False),  # an accelerator plugin (CUDA, ROCm, ...): JAX's choice
    ({"JAX_PLATFORMS": "tpu"}, None, 0, False, False, False),
    ({}, "tpu,cpu", 0, False, False, False),  # jax.config.update("jax_platforms", ...)
    ({"JAX_FORCE_TPU_INIT": "1"}, None, 0, False, False, False),
])
def test_the_cpu_is_chosen_only_where_there_is_no_accelerator(environ, platforms, tpu_chips,
                                                              nvidia_gpu, plugins, cpu):
  from unires_jax.cli import common  # pylint: disable=g-import-not-at-top

  assert common.cpu_instead_of_absent_tpu(environ, platforms, tpu_chips, nvidia_gpu,
                                          plugins) == cpu


def test_no_libtpu_noise_before_a_programs_output(tmp_path):
  """`unires-train` as on a CPU host with the test extra's libtpu: its only output is ours (the
  mesh, then the error). ALLOW_MULTIPLE_LIBTPU_LOAD: a test compiling for TPU beside this one
  holds libtpu's lock file, which would keep the probe (and its noise) from happening."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

  if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    pytest.skip("a TPU host: JAX uses its TPU, as it should")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # conftest's default
  run = subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), "unires-train"), "--config=tiny",
       f"--workdir={tmp_path}/run"], capture_output=True, text=True, cwd=tmp_path, check=False,
      env={**env, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
  assert run.returncode == 2
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 2, run.stderr[-3000:]
  assert re.search(r"trainer.py:\d+\] mesh .* over \d+ devices", lines[0]), run.stderr
  assert lines[1].startswith("unires-train: error: no tokenizer directory given")
