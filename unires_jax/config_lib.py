"""Loading `configs/*.py` files the way the `--config=path.py:arg` flag does, and a run's resolved
config to and from `config.json`."""

import importlib.util
import json
import os

import ml_collections
from etils import epath

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


CONFIG_FILE = "config.json"  # beside a run's checkpoints and in a converted checkpoint


def _tuples(value):
  """JSON lists back to the tuples configs hold (a frozen config must be hashable)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text: str, source: str = "config.json") -> ml_collections.ConfigDict:
  """The inverse of `config_to_json` (lists become tuples); `source` names the file in errors."""
  try:
    values = json.loads(text)
  except ValueError as e:
    raise ValueError(f"{source} is not valid JSON: {e}") from None
  if not isinstance(values, dict):
    raise ValueError(f"{source} holds a {type(values).__name__}, not a config")
  return ml_collections.ConfigDict(_tuples(values))


def write_config_json(config: ml_collections.ConfigDict, directory: str) -> str:
  """Writes `directory/config.json` atomically (a temporary file renamed onto it); returns its path.
  `directory` may be a gs:// path."""
  path = epath.Path(directory) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{CONFIG_FILE}.tmp-{os.getpid()}"
  tmp.write_text(config_to_json(config))
  tmp.replace(path)
  return str(path)


def read_config_json(directory: str) -> ml_collections.ConfigDict:
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
  return config_from_json(path.read_text(), str(path))
