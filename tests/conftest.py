"""Shared test setup: configs loaded from configs/, seeded NumPy, single-threaded torch."""

import importlib.util
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg=None):
  """configs/<name>.py's get_config(arg), as the command-line config flag would load it."""
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  torch.set_num_threads(1)
