"""Config files (`configs/*.py`) by path or by name, their `get_config(arg)` variants, and a run's
resolved config to and from `config.json`.

The repository's `configs/` folder is installed as the package `unires_jax.configs`, so
`configs/tiny.py` (or `tiny.py`, or `tiny`) names the same file from any directory, also after a
non-editable `pip install .`: a path that exists from the working directory wins, otherwise the
installed config of that name is taken.

Variants follow big_vision: `--config=configs/unires_pp_7b.py:llm_layers=4` passes
"llm_layers=4" to `get_config`, which reads it with `parse_arg`.
"""

import importlib
import importlib.util
import json
import os

import ml_collections
from etils import epath

from unires_jax import utils

CONFIG_FILE = "config.json"  # beside a run's checkpoints and in a converted checkpoint


def installed_configs_dir() -> str:
  """The folder of the installed `configs/*.py` (the repository's `configs/` in a checkout)."""
  return os.path.dirname(importlib.import_module("unires_jax.configs").__file__)


def installed_configs() -> list[str]:
  """Names of the installed configs, e.g. ["demo", "tiny", "unires_pp_7b"]."""
  return sorted(name[:-3] for name in os.listdir(installed_configs_dir())
                if name.endswith(".py") and not name.startswith("_"))


def resolve(path: str) -> str:
  """The config file `path` names: the file itself when it exists from the working directory,
  else the installed config of that name (`configs/tiny.py`, `tiny.py` and `tiny` all name
  `tiny`). Raises a ValueError listing the installed configs otherwise."""
  if os.path.isfile(path):
    return path
  head, name = os.path.split(path)
  stem = name[:-3] if name.endswith(".py") else name
  if head in ("", "configs") and stem in installed_configs():
    return os.path.join(installed_configs_dir(), f"{stem}.py")
  raise ValueError(f"config file {path!r} not found from {os.getcwd()}, and it names no "
                   f"installed config (configs/NAME.py with NAME in {installed_configs()})")


def split_spec(spec: str) -> tuple[str, str | None]:
  """"configs/x.py:arg" -> (the resolved path, "arg"); no ":" -> (path, None)."""
  path, sep, arg = spec.partition(":")
  return resolve(path), (arg if sep else None)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of "configs/x.py[:arg]" (see `resolve`), as `--config=spec` gives it."""
  path, arg = split_spec(spec)
  module_spec = importlib.util.spec_from_file_location("unires_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg)")
  return module.get_config(arg)


def sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
  """The config `name` ("tiny.py") of the folder of `config_file` (a config's own `__file__`):
  how one config builds on another wherever the folder lies."""
  return load_config(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def _parse_value(text: str, default, key: str):
  """`text` as the type of `default` (bool accepts true/false/1/0)."""
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"config argument {key}={text!r} is not a boolean (true, false)")
    return text.lower() in ("true", "1")
  if isinstance(default, (int, float)):
    try:
      return type(default)(text)
    except ValueError:
      raise ValueError(f"config argument {key}={text!r} is not {type(default).__name__}") from None
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """A config's `get_config(arg)` argument "key=value,key2=value2" read against `defaults`
  (each value takes its default's type; a bare "key" sets a boolean). As big_vision's.

  Raises a ValueError naming an unknown key and the known ones.
  """
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; this config takes "
                       f"{sorted(defaults) or 'no argument'}")
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      text = "true"
    values[key] = _parse_value(text.strip(), defaults[key], key)
  return ml_collections.ConfigDict(values)


def _tuples(value):
  """JSON lists back to the tuples configs hold (a frozen config must be hashable)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text: str, source: str = CONFIG_FILE) -> ml_collections.ConfigDict:
  """The inverse of `config_to_json` (lists become tuples); `source` names the file in errors."""
  try:
    values = json.loads(text)
  except ValueError as e:
    raise ValueError(f"{source} is not valid JSON: {e}") from None
  if not isinstance(values, dict):
    raise ValueError(f"{source} holds a {type(values).__name__}, not a config")
  return ml_collections.ConfigDict(_tuples(values))


def write_config_json(config: ml_collections.ConfigDict, directory: str) -> str:
  """Writes `directory/config.json` atomically; returns its path. `directory` may be gs://."""
  path = os.path.join(directory, CONFIG_FILE)
  utils.write_atomic(path, config_to_json(config))
  return path


def read_config_json(directory: str) -> ml_collections.ConfigDict:
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
  return config_from_json(path.read_text(), str(path))
