"""The mesh from the config and the logical-to-mesh rules table, on the full-size model."""

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from unires_jax import parallel, utils
from unires_jax.config_lib import load_config
from unires_jax.parallel import mesh as mesh_lib
from unires_jax.models import layers
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.parallel.sharded_model import abstract_model
from unires_jax.train import step as step_lib
from unires_jax.train.state import StateFactory


RULES = parallel.rules_from_config(load_config("tiny"))


def _mesh(data, fsdp, tensor):
  return parallel.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_shape_resolves_one_free_axis():
  assert mesh_lib.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  assert mesh_lib.mesh_shape(dict(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
  assert _mesh(-1, 4, 2).shape == {"data": 1, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize("cfg, message", [
    (dict(data=-1, fsdp=-1, tensor=1), "one may be -1"),
    (dict(data=3, fsdp=1, tensor=1), "needs 3 devices"),
    (dict(data=-1, fsdp=3, tensor=1), "does not divide 8"),
    (dict(data=2, pipeline=2), "unknown axes"),
    (dict(data=0, fsdp=-1), "sizes must be positive"),
])
def test_mesh_shape_errors(cfg, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.mesh_shape(cfg, 8)


def test_logical_to_mesh():
  mesh = _mesh(2, 2, 2)
  assert parallel.logical_to_mesh(("embed", "mlp"), (64, 128), mesh, RULES) == P("fsdp", "tensor")
  assert parallel.logical_to_mesh(("vocab", "embed"), (138, 64), mesh, RULES) == P("tensor", "fsdp")
  # A size the mesh axis does not divide stays replicated.
  assert parallel.logical_to_mesh(("embed", "mlp"), (3, 16), mesh, RULES) == P(None, "tensor")
  assert parallel.logical_to_mesh(("mlp", None), (64, 1), mesh, RULES) == P("tensor", None)
  # Convolution channels stay replicated (see the rules module's docstring).
  assert parallel.logical_to_mesh(
      ("conv_window", "conv_window", "conv_in", "conv_out"), (7, 7, 16, 16), mesh, RULES
  ) == P(None, None, None, None)


def test_logical_to_mesh_errors():
  mesh = _mesh(2, 2, 2)
  with pytest.raises(ValueError, match="'heads' and 'mlp' both map to mesh axis 'tensor'"):
    parallel.logical_to_mesh(("heads", "mlp"), (8, 8), mesh, RULES, where="w")
  with pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
    parallel.logical_to_mesh(("bogus",), (8,), mesh, RULES)
  with pytest.raises(ValueError, match="2 axis names"):
    parallel.logical_to_mesh(("embed", "mlp"), (8,), mesh, RULES)


def _param_specs(config, mesh):
  _, params = abstract_model(config)
  shardings = parallel.state_shardings(params, mesh, parallel.rules_from_config(config))
  leaves = jax.tree_util.tree_leaves_with_path(
      shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  shapes = jax.tree_util.tree_leaves(params)
  return {utils.path_str(p): (v.get_value().spec, s.shape) for (p, v), s in zip(leaves, shapes)}


def test_full_model_follows_the_rules():
  """Every parameter of the 7B model resolves without conflict; the big ones shard both ways."""
  config = load_config("configs/unires_pp_7b.py")
  config.model.scan_layers = False  # every layer by name; test_scanned_model_follows_the_rules
  specs = _param_specs(config, _mesh(2, 2, 2))
  assert len(specs) > 1000
  both = {path for path, (spec, _) in specs.items() if "fsdp" in spec and "tensor" in spec}
  for path in ("llm/model/layers/0/self_attn/q_proj/kernel",
               "llm/model/layers/31/mlp/down_proj/kernel", "llm/model/embed_tokens/embedding",
               "llm/lm_head/kernel", "vision/encoder/layers/0/mlp/fc1/kernel",
               "convnext/stages/2/blocks/0/mlp/fc1/kernel", "image_projector/layers/0/kernel"):
    assert path in both, (path, specs[path])
  # Almost all parameter bytes are sharded on both axes.
  size = lambda shape: int(np.prod(shape))
  total = sum(size(shape) for _, shape in specs.values())
  sharded = sum(size(specs[p][1]) for p in both)
  assert sharded / total > 0.99


def test_rules_come_from_the_config_and_name_a_bad_field():
  config = load_config("tiny")
  assert dict(parallel.rules_from_config(config))["activation_batch"] == ("data", "fsdp")
  assert dict(parallel.rules_from_config(config))["conv_in"] is None
  config.logical_axis_rules.mlp = "fsdp,model"
  with pytest.raises(ValueError, match=r"config.logical_axis_rules.mlp='fsdp,model': unknown mesh "
                     r"axis 'model'"):
    parallel.rules_from_config(config)


def _lowered_step(config, mesh):
  """The tiny train step traced and lowered for `mesh` (nothing compiled or allocated): the
  factory's parameter shardings and the StableHLO text."""
  factory = StateFactory(config, mesh)
  batch = step_lib.model_fields(synthetic_batch(config.model, 8))
  rows = parallel.batch_sharding(mesh)
  inputs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in batch.items()}
  text = step_lib.make_train_step(factory).lower(factory.abstract_sharded(), inputs).as_text()
  specs = {utils.path_str(p): v.get_value().spec for p, v in jax.tree_util.tree_leaves_with_path(
      factory.shardings.params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  return specs, text


def _residual_constraints(text):
  """The width dimension's mesh axes in the step's sharding constraints on [batch, tokens, width]
  activations (batch over data x fsdp, tokens whole), as Shardy writes them in the StableHLO."""
  return re.findall(r'sdy\.sharding_constraint %\S+ <@\w+, \[\{"data", "fsdp"\}, \{\}, '
                    r'\{([^}]*)\}\]>', text)


def test_a_rule_changed_in_the_config_moves_the_compiled_step():
  """`mlp` made replicated re-shards the MLP kernels; `activation_embed` moved from
  replicated to tensor splits the residual streams' width over tensor in the step."""
  mesh = _mesh(2, 2, 2)
  config = load_config("tiny")
  specs, text = _lowered_step(config, mesh)
  path = "llm/model/layers/0/mlp/up_proj/kernel"
  assert specs[path] == P("fsdp", "tensor")
  before = _residual_constraints(text)
  assert before and set(before) == {""}  # width whole

  config.logical_axis_rules.update(mlp="", activation_embed="tensor")
  specs, text = _lowered_step(config, mesh)
  assert specs[path] == P("fsdp", None)
  after = _residual_constraints(text)
  assert len(after) == len(before) and set(after) == {'"tensor"'}


def test_scanned_model_follows_the_rules():
  """With scan_layers the stacked layers keep their leading `layers` axis whole and shard the
  rest as their unrolled counterparts do."""
  config = load_config("configs/unires_pp_7b.py:llm_layers=2")
  config.model.scan_layers = True
  specs = _param_specs(config, _mesh(2, 2, 2))
  stacked = {path: spec for path, (spec, _) in specs.items() if "/layers/" in path
             and path.startswith(("llm/model/layers/", "vision/encoder/layers/"))}
  assert len(stacked) == 9 + 16  # one per parameter of a LLaMA layer and of a CLIP layer
  for path, spec in stacked.items():
    assert spec[0] is None, (path, spec)
    assert not path.split("/layers/")[1].split("/")[0].isdigit(), path
  assert stacked["llm/model/layers/self_attn/q_proj/kernel"] == P(None, "fsdp", "tensor")
  assert stacked["llm/model/layers/mlp/down_proj/kernel"] == P(None, "tensor", "fsdp")
  assert stacked["vision/encoder/layers/mlp/fc1/kernel"] == P(None, "fsdp", "tensor")
  assert stacked["llm/model/layers/input_layernorm/scale"] == P(None, "fsdp")
  assert specs["llm/model/layers/mlp/up_proj/kernel"][1] == (2, 4096, 11008)
  # The mask decoder's stacked layers: the `layers` axis whole, the rest as unrolled.
  config.model.scan_layers = False
  unrolled = _param_specs(config, _mesh(2, 2, 2))
  decoder = {path: spec for path, (spec, _) in specs.items()
             if path.startswith("mask_decoder/transformer_") and layers.is_stacked_path(path)}
  assert len(decoder) == 10 + 10 + 6  # cross-attention, self-attention, FFN layer parameters
  for path, spec in decoder.items():
    assert spec == P(None, *unrolled[layers.layer_path(path, 0)][0]), path


def test_lora_adapters_follow_the_rules():
  """LoRA's adapters (scanned) shard as their projection's input / output dimension, the rank
  dimension whole (`lora_rank`, replicated in every config's table)."""
  config = load_config("configs/unires_pp_7b.py:llm_layers=2")
  assert config.logical_axis_rules.lora_rank == ""
  config.model.scan_layers = True
  config.model.llm.lora.update(rank=8, targets=("q_proj", "down_proj"))
  specs = _param_specs(config, _mesh(2, 2, 2))
  q, down = "llm/model/layers/self_attn/q_proj", "llm/model/layers/mlp/down_proj"
  assert specs[f"{q}/lora_a"] == (P(None, "fsdp", None), (2, 4096, 8))
  assert specs[f"{q}/lora_b"] == (P(None, None, "tensor"), (2, 8, 4096))
  assert specs[f"{down}/lora_a"] == (P(None, "tensor", None), (2, 11008, 8))
  assert specs["llm/new_token_embedding"][1] == (10, 4096)
  assert specs["llm/new_token_head"][1] == (4096, 10)
