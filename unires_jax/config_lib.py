"""Loading `configs/*.py` files the way the `--config=path.py:arg` flag does."""

import importlib.util
import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/tiny.py' or 'configs/x.py:arg' (or a bare name 'tiny') -> the ConfigDict.

  A relative path that does not exist from the working directory is looked up from the
  repository root, so tests and tools run from anywhere.
  """
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    path = os.path.join("configs", f"{path}.py")
  if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO_ROOT, path)):
    path = os.path.join(REPO_ROOT, path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location("unires_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg)")
  return module.get_config(arg or None)
