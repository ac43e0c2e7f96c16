"""The whole UniRES++ to a directory of PyTorch-loadable parts and back (convert/unires.py)."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import timm
import transformers
from flax import nnx

from unires_jax import checkpoint, models
from unires_jax.config_lib import load_config
from unires_jax.convert import torch_io
from unires_jax.convert import unires as convert_unires


@pytest.fixture(scope="module")
def config():
  return load_config("tiny")


def _params(model) -> dict[str, np.ndarray]:
  return {path: np.asarray(var[...]) for path, var in torch_io.iter_params(model)}


def test_round_trip_is_bit_identical_and_parts_load_in_pytorch(config, tmp_path):
  model = models.build_model(config, nnx.Rngs(0))
  out = tmp_path / "exported"
  convert_unires.export_pytorch(model, config.model, str(out))
  assert sorted(os.listdir(out)) == ["config.json", "high_res_encoder", "llm",
                                     "unires_heads.safetensors", "vision_tower"]
  assert sorted(os.listdir(tmp_path)) == ["exported"]  # no temporary left behind

  llm = transformers.LlamaForCausalLM.from_pretrained(out / "llm")
  assert llm.config.vocab_size == model.llm.vocab_size  # the special-token rows are exported
  np.testing.assert_array_equal(llm.model.embed_tokens.weight.detach().numpy(),
                                np.asarray(model.llm.model.embed_tokens.embedding[...]))
  vision = transformers.CLIPVisionModel.from_pretrained(out / "vision_tower")
  assert vision.config.num_hidden_layers == config.model.vision.num_layers
  spec = json.loads((out / "high_res_encoder" / "config.json").read_text())
  trunk = timm.create_model(spec["timm_model"], num_classes=0, **spec["model_args"])
  missing = trunk.load_state_dict(safetensors.torch.load_file(
      out / "high_res_encoder" / "model.safetensors"), strict=False).missing_keys
  assert sorted(missing) == ["head.norm.bias", "head.norm.weight"]
  heads = safetensors.numpy.load_file(out / "unires_heads.safetensors")
  assert set(heads) == set(convert_unires.head_paths(model))
  assert json.loads((out / "config.json").read_text())["llm"]["hidden_size"] == 64

  back = models.build_model(config, nnx.Rngs(1))  # other initial values everywhere
  convert_unires.import_pytorch(back, config.model, str(out))
  ours, theirs = _params(model), _params(back)
  assert ours.keys() == theirs.keys()
  for path, value in ours.items():
    np.testing.assert_array_equal(theirs[path], value, err_msg=path)


def _tensors(directory) -> dict[str, np.ndarray]:
  """Every tensor of an export directory, by file and name."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      if name.endswith(".safetensors"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, directory)
        out.update({f"{rel}:{k}": v for k, v in safetensors.numpy.load_file(path).items()})
  return out


def test_scanned_layers_export_as_unrolled_from_memory_and_from_a_checkpoint(config, tmp_path):
  """A scanned model (the unrolled one's parameters stacked: same seed) exports the very
  tensors of the unrolled one, from memory and from an Orbax checkpoint (`export_checkpoint`,
  which unstacks the saved stacked tensors), and imports back bit-identically."""
  scanned_config = config.copy_and_resolve_references()
  scanned_config.model.scan_layers = True
  unrolled = models.build_model(config, nnx.Rngs(0))
  scanned = models.build_model(scanned_config, nnx.Rngs(0))
  assert scanned.llm.model.layers.mlp.up_proj.kernel[...].shape[0] == config.model.llm.num_layers
  assert scanned.mask_decoder.transformer_ffn_layers.linear1.kernel[...].shape[0] == (
      config.model.mask_decoder.num_layers)
  convert_unires.export_pytorch(unrolled, config.model, str(tmp_path / "unrolled"))
  convert_unires.export_pytorch(scanned, scanned_config.model, str(tmp_path / "scanned"))
  checkpoint.save_converted(nnx.state(scanned, nnx.Param), scanned_config, str(tmp_path / "ckpt"))
  convert_unires.export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "from_ckpt"),
                                   group_bytes=64 << 10)
  want = _tensors(tmp_path / "unrolled")
  for name in ("scanned", "from_ckpt"):
    got = _tensors(tmp_path / name)
    assert got.keys() == want.keys(), name
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"{name} {key}")

  back = models.build_model(scanned_config, nnx.Rngs(1))
  convert_unires.import_pytorch(back, scanned_config.model, str(tmp_path / "scanned"))
  ours, theirs = _params(scanned), _params(back)
  assert ours.keys() == theirs.keys()
  for path, value in ours.items():
    np.testing.assert_array_equal(theirs[path], value, err_msg=path)


def test_wrong_inputs_fail_clearly_and_leave_nothing(config, tmp_path):
  model = models.build_model(config, nnx.Rngs(0))
  out = tmp_path / "exported"
  convert_unires.export_pytorch(model, config.model, str(out))
  with pytest.raises(FileExistsError, match="already exists"):
    convert_unires.export_pytorch(model, config.model, str(out))

  wider = config.copy_and_resolve_references()
  wider.model.llm.hidden_size = 96
  with pytest.raises(ValueError, match="llm config field 'hidden_size' is 96"):
    convert_unires.import_pytorch(models.build_model(wider, nnx.Rngs(0)), wider.model, str(out))

  heads_path = out / "unires_heads.safetensors"
  heads = safetensors.numpy.load_file(heads_path)
  name = min(heads)
  del heads[name]
  safetensors.numpy.save_file(heads, heads_path)
  with pytest.raises(torch_io.CheckpointError, match=f"tensor '{name}' is missing"):
    convert_unires.import_pytorch(models.build_model(config, nnx.Rngs(1)), config.model, str(out))

  heads_path.write_bytes(heads_path.read_bytes()[:100])  # truncated
  with pytest.raises(torch_io.CheckpointError, match="not a readable safetensors file"):
    convert_unires.import_pytorch(models.build_model(config, nnx.Rngs(1)), config.model, str(out))
