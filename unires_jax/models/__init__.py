"""Model registry: `config.model_name` names the model class, as in big_vision."""

import importlib

import ml_collections
from flax import nnx

_MODELS = {
    "unires_pp": "unires_jax.models.unires:UniRESPP",
}


def get_model_class(name: str) -> type[nnx.Module]:
  """The class registered under `name`."""
  if name not in _MODELS:
    raise ValueError(f"unknown config.model_name {name!r}; registered: {sorted(_MODELS)}")
  module, _, cls = _MODELS[name].partition(":")
  return getattr(importlib.import_module(module), cls)


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """`config.model_name` built from `config.model`."""
  return get_model_class(config.model_name)(config.model, rngs=rngs)
