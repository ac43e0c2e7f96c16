"""A non-editable install (`pip install .` into a fresh virtual environment) runs the README's
commands from a directory that is not the checkout: `unires-train` and `unires-eval` find
`configs/tiny.py` by that name, and `configs/unires_pp_7b.py:llm_layers=4` selects a variant."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.repo import ROOT

# What the wheel is built from: the checkout without its git data and build leftovers.
_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".venv",
                                 ".pytest_cache", ".hypothesis")


def _run(args, cwd, **kwargs) -> subprocess.CompletedProcess:
  run = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900, check=False,
                       **kwargs)
  assert run.returncode == 0, f"{args}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
  return run


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
  """The `bin/` of a new virtual environment holding a regular install of a copy of the
  checkout. Its dependencies come from this environment (a .pth file; nothing is downloaded);
  the package itself only from the new one."""
  root = tmp_path_factory.mktemp("install")
  source = root / "source"
  shutil.copytree(ROOT, source, ignore=_IGNORE)
  venv = root / "venv"
  _run([sys.executable, "-m", "venv", str(venv)], cwd=root)
  python = venv / "bin" / "python"
  site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              cwd=root).stdout.strip()
  with open(os.path.join(site, "unires_test_dependencies.pth"), "w", encoding="utf-8") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
        "--no-index", str(source)], cwd=root)
  shutil.rmtree(source)  # the install must not need its source tree
  where = _run([str(python), "-c", "import unires_jax; print(unires_jax.__file__)"],
               cwd=root).stdout.strip()
  assert where.startswith(site), where
  return str(venv / "bin")


@pytest.mark.slow
def test_train_and_eval_by_config_name_from_another_directory(installed, shapes_root, tmp_path):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  workdir = tmp_path / "run"
  # The tiny model one layer deep (as tests/train/shapes_config.py): finding the config by name
  # does not depend on depth, and each command compiles in about three quarters of the time.
  data = [f"--config.input.data_dir={shapes_root}/tfds",
          f"--config.input.tokenizer={shapes_root}/tokenizer",
          "--config.evals.shapes_parts_val.batch_size=8", "--config.model.vision.num_layers=2",
          "--config.model.llm.num_layers=1", "--config.model.convnext.depths=(1,1,1,1)",
          "--config.model.mask_decoder.num_layers=1"]
  _run([os.path.join(installed, "unires-train"), "--config=configs/tiny.py",
        f"--workdir={workdir}", *data, "--config.train.num_steps=2",
        "--config.train.checkpoint_every=2", "--config.train.log_every=1",
        "--config.optimizer.warmup_steps=1", "--config.input.global_batch_size=8",
        "--progress=false"], cwd=elsewhere)
  result = workdir / "eval" / "shapes_parts_val_2.json"
  trained = json.loads(result.read_text())
  result.unlink()
  _run([os.path.join(installed, "unires-eval"), "--config=configs/tiny.py",
        f"--workdir={workdir}", *data], cwd=elsewhere)
  evaluated = json.loads(result.read_text())
  assert evaluated["step"] == trained["step"] == 2
  assert evaluated["metrics"] == pytest.approx(trained["metrics"], nan_ok=True)


@pytest.mark.slow
def test_config_variants_from_another_directory(installed, tmp_path):
  def llm_parameters(spec: str) -> int:
    out = _run([os.path.join(installed, "unires-summary"), f"--config={spec}"],
               cwd=tmp_path).stdout
    return int(next(line.split()[1] for line in out.splitlines()
                    if line.startswith("llm ")).replace(",", ""))

  # Few layers: the summary builds the model abstractly, and 32 layers take ~30 s on a CPU.
  one, two = (llm_parameters(f"configs/unires_pp_7b.py:llm_layers={n}") for n in (1, 2))
  # Vicuna-7B: 202,383,360 parameters per decoder layer (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096).
  assert two - one == 202_383_360
  run = subprocess.run([os.path.join(installed, "unires-summary"),
                        "--config=configs/unires_pp_7b.py:llm_layer=4"], cwd=tmp_path,
                       capture_output=True, text=True, check=False)
  assert run.returncode != 0 and "unknown config argument 'llm_layer'" in run.stderr
