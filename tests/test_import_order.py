"""TensorFlow, then Triton (which torch / transformers import), in one process: with the pinned
packages that order crashes the process (SIGSEGV, no message), so the package must load them in
the order that works. The pytest process imports Triton first (tests/conftest.py); a user's
notebook does not, hence a fresh subprocess here."""

import subprocess
import sys

from tests.repo import ROOT

# A TFDS build (the project's writer and builder: TensorFlow encodes the features), then the
# PyTorch side (`unires_jax.torch`: transformers, timm, torch and, through them, Triton).
_BUILD_THEN_TORCH = """
import sys, tempfile
from unires_jax.data import build, shapes_parts
from unires_jax.data.writers import refcocom
root = tempfile.mkdtemp()
refcocom.write(root + "/raw", {"val": shapes_parts.generate(2, seed=0, image_size=32)},
               with_proposals=False)
build.prepare("ref_coco_m", manual_dir=root + "/raw", data_dir=root + "/tfds")
assert "tensorflow" in sys.modules
import torch
import unires_jax.torch
print("ok", torch.ones(2).sum().item())
"""


def test_a_tfds_build_then_the_pytorch_side_in_one_process():
  """`build.prepare` loads Triton before TensorFlow (`utils.triton_before_tensorflow`)."""
  run = subprocess.run([sys.executable, "-c", _BUILD_THEN_TORCH], capture_output=True, text=True,
                       cwd=ROOT, check=False, timeout=300)
  assert run.returncode == 0, f"exit status {run.returncode}\n{run.stderr[-3000:]}"
  assert run.stdout.splitlines()[-1] == "ok 2.0"


def test_tensorflow_first_then_unires_torch_is_an_import_error_not_a_crash():
  """Where TensorFlow came first, outside the package, `unires_jax.torch` says so and how to
  avoid it instead of the process dying without a word."""
  run = subprocess.run(
      [sys.executable, "-c", "import tensorflow\ntry:\n  import unires_jax.torch\n"
       "except ImportError as e:\n  print('ImportError:', e)"],
      capture_output=True, text=True, cwd=ROOT, check=False, timeout=300)
  assert run.returncode == 0, f"exit status {run.returncode}\n{run.stderr[-3000:]}"
  assert "ImportError: unires_jax.torch imports Triton, and TensorFlow is already loaded" in (
      run.stdout), run.stdout
