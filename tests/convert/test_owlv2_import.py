"""The OWLv2 importer: building from a save_pretrained directory, and its errors (config field,
missing and unexpected tensors). Output parity through the importer: tests/models/test_owlv2.py."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

from tests.owlv2_files import hf_config  # pylint: disable=g-import-not-at-top
from unires_jax.convert import owlv2 as convert_owlv2  # pylint: disable=g-import-not-at-top
from unires_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
from unires_jax.models import owlv2  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.Owlv2ForObjectDetection(hf_config(owlv2.tiny(), eos_token_id=99)).eval()
  path = str(tmp_path_factory.mktemp("owlv2"))
  model.save_pretrained(path)
  return path


def _rewritten(hf_dir, tmp_path, edit) -> str:
  """A copy of `hf_dir` whose tensors went through `edit(dict)`."""
  tensors = load_file(os.path.join(hf_dir, torch_io.SAFETENSORS_SINGLE))
  edit(tensors)
  save_file(tensors, str(tmp_path / torch_io.SAFETENSORS_SINGLE))
  os.symlink(os.path.join(hf_dir, "config.json"), tmp_path / "config.json")
  return str(tmp_path)


def test_from_pretrained_reads_config_and_every_tensor(hf_dir):
  module, cfg = convert_owlv2.from_pretrained(hf_dir)
  assert cfg.to_dict() == owlv2.tiny().to_dict()
  tensors = load_file(os.path.join(hf_dir, torch_io.SAFETENSORS_SINGLE))
  params = dict(torch_io.iter_params(module))
  total = sum(int(np.prod(v.get_value().shape)) for v in params.values())
  assert total == sum(t.size for t in tensors.values())
  # Spot checks of the name rules and layouts (Linear transposed, conv to HWIO).
  np.testing.assert_array_equal(params["text_model/embeddings/token_embedding"][...],
                                tensors["owlv2.text_model.embeddings.token_embedding.weight"])
  np.testing.assert_array_equal(params["class_head/logit_scale/kernel"][...],
                                tensors["class_head.logit_scale.weight"].T)
  np.testing.assert_array_equal(params["vision_model/pre_layrnorm/scale"][...],
                                tensors["owlv2.vision_model.pre_layernorm.weight"])
  np.testing.assert_array_equal(
      params["vision_model/embeddings/patch_embedding/kernel"][...],
      tensors["owlv2.vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
  assert float(params["logit_scale"][...]) == float(tensors["owlv2.logit_scale"])
  assert all(isinstance(v.get_value(), jax.Array) for v in params.values())


def test_config_mismatch_names_field(hf_dir):
  hf = torch_io.read_config_json(hf_dir)
  convert_owlv2.check_config(owlv2.tiny(), hf)
  cfg = owlv2.tiny()
  cfg.text.num_heads = 4
  with pytest.raises(ValueError, match=r"'text\.num_heads' is 4 .* says 2"):
    convert_owlv2.load_owlv2(owlv2.Owlv2ForObjectDetection(cfg, rngs=nnx.Rngs(0)), hf_dir, cfg=cfg)
  cfg = owlv2.tiny()
  cfg.vision.layer_norm_eps = 1e-6  # shows in no parameter shape
  with pytest.raises(ValueError, match=r"'vision\.layer_norm_eps'"):
    convert_owlv2.check_config(cfg, hf)


def test_released_defaults_fill_missing_fields():
  # A config.json that leaves fields at transformers' defaults (as the released ones do).
  cfg = convert_owlv2.config_from_hf({"projection_dim": 512,
                                      "vision_config": {"image_size": 960}})
  assert cfg.to_dict() == owlv2.base_patch16().to_dict()


def test_missing_tensor_names_key(hf_dir, tmp_path):
  missing = "owlv2.text_model.encoder.layers.1.mlp.fc2.bias"
  model_dir = _rewritten(hf_dir, tmp_path, lambda t: t.pop(missing))
  with pytest.raises(torch_io.CheckpointError, match=missing):
    convert_owlv2.from_pretrained(model_dir)


def test_missing_head_tensor_names_key(hf_dir, tmp_path):
  missing = "objectness_head.dense2.weight"
  model_dir = _rewritten(hf_dir, tmp_path, lambda t: t.pop(missing))
  with pytest.raises(torch_io.CheckpointError, match=missing):
    convert_owlv2.from_pretrained(model_dir)


def test_unexpected_tensor_is_an_error_but_buffers_are_not(hf_dir, tmp_path):
  extra = "class_head.logit_bias"

  def edit(tensors):
    tensors[extra] = np.zeros(1, np.float32)
    tensors["box_bias"] = np.zeros((16, 4), np.float32)  # stored by some checkpoints
    tensors["owlv2.text_model.embeddings.position_ids"] = np.arange(8)[None]

  model_dir = _rewritten(hf_dir, tmp_path, edit)
  with pytest.raises(torch_io.CheckpointError, match=extra):
    convert_owlv2.from_pretrained(model_dir)
