"""CLIP ViT vision tower: parity with transformers.CLIPVisionModel, import, errors, full size."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

from unires_jax import config_lib  # pylint: disable=g-import-not-at-top
from unires_jax.convert import clip_vit as convert_clip  # pylint: disable=g-import-not-at-top
from unires_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
from unires_jax.models import clip_vit  # pylint: disable=g-import-not-at-top

ATOL = 1e-4  # float32 on both sides; max abs error over hidden states of magnitude ~1.


def _tiny_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = config_lib.load_config("tiny").model.vision
  cfg.update(overrides)
  return cfg


def _hf_vision_config(cfg) -> "transformers.CLIPVisionConfig":
  return transformers.CLIPVisionConfig(
      image_size=cfg.image_size,
      patch_size=cfg.patch_size,
      num_channels=cfg.num_channels,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      layer_norm_eps=cfg.layer_norm_eps,
      hidden_act=cfg.hidden_act,
  )


def _randomize(model: "torch.nn.Module", seed: int) -> None:
  """Perturbs every weight so that norms' scale/bias and all biases matter for parity."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(_hf_vision_config(_tiny_cfg())).eval()
  _randomize(model, seed=1)
  return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("clip_vision"))
  hf_model.save_pretrained(path)
  return path


def _loaded(model_dir: str, cfg=None, scan_layers=False) -> clip_vit.CLIPVisionTransformer:
  cfg = cfg or _tiny_cfg()
  module = clip_vit.CLIPVisionTransformer(cfg, scan_layers=scan_layers, rngs=nnx.Rngs(0))
  convert_clip.load_clip_vision(module, model_dir, cfg=cfg)
  return module


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def ours(hf_dir, request):
  """The import of `hf_dir`, with unrolled or scanned layers (`scan_layers`)."""
  return _loaded(hf_dir, scan_layers=request.param)


def _run_both(hf_model, module, height, width, interpolate, jit=False):
  pixels = np.random.default_rng(height * 1000 + width).normal(size=(2, 3, height, width))
  pixels = pixels.astype(np.float32)
  with torch.no_grad():
    ref = hf_model(
        torch.from_numpy(pixels),
        output_hidden_states=True,
        interpolate_pos_encoding=interpolate,
    )
  call = lambda m, x: m(x, interpolate_pos_encoding=interpolate)
  out = (nnx.jit(call) if jit else call)(module, pixels.transpose(0, 2, 3, 1))
  return ref, out


def _max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - b.numpy())))


def _assert_parity(ref, out, num_layers):
  assert len(ref.hidden_states) == len(out.hidden_states) == num_layers + 1
  for i, (r, o) in enumerate(zip(ref.hidden_states, out.hidden_states)):
    assert o.shape == tuple(r.shape), i
    assert _max_err(o, r) < ATOL, f"hidden state {i}: max abs error {_max_err(o, r)}"
  assert _max_err(out.last_hidden_state, ref.last_hidden_state) < ATOL
  assert _max_err(out.pooled, ref.pooler_output) < ATOL


def test_matches_transformers_at_config_size(hf_model, ours):
  ref, out = _run_both(hf_model, ours, 32, 32, interpolate=False, jit=True)
  _assert_parity(ref, out, num_layers=3)


@pytest.mark.parametrize("height,width", [(48, 40), (24, 16)])  # 6x5 and 3x2 grids from 4x4.
def test_matches_transformers_with_interpolated_positions(hf_model, ours, height, width):
  ref, out = _run_both(hf_model, ours, height, width, interpolate=True)
  assert out.last_hidden_state.shape == (2, 1 + (height // 8) * (width // 8), 32)
  _assert_parity(ref, out, num_layers=3)


@pytest.mark.parametrize("in_size,out_size", [(4, 6), (4, 3), (24, 24), (5, 17), (7, 2)])
def test_bicubic_matrix_matches_torch(in_size, out_size):
  # float64 on both sides: the matrix must be torch's kernel, not just close to it.
  x = np.random.default_rng(0).normal(size=(1, 1, in_size, 3))
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(x), size=(out_size, 3), mode="bicubic", align_corners=False
  ).numpy()
  ours = np.einsum("oi,iw->ow", clip_vit.bicubic_resize_matrix(in_size, out_size), x[0, 0])
  np.testing.assert_allclose(ours, ref[0, 0], atol=1e-12, rtol=0)


def test_features_are_penultimate_layer_without_cls(hf_model, ours):
  assert ours.num_patches == ours.num_feature_tokens == 16
  ref, out = _run_both(hf_model, ours, 32, 32, interpolate=False)
  assert out.features.shape == (2, 16, 32)
  assert _max_err(out.features, ref.hidden_states[-2][:, 1:]) < ATOL


def test_cls_patch_keeps_cls(hf_model, hf_dir):
  module = _loaded(hf_dir, _tiny_cfg(select_feature="cls_patch", select_layer=-1))
  assert module.num_feature_tokens == 17
  ref, out = _run_both(hf_model, module, 32, 32, interpolate=False)
  assert _max_err(out.features, ref.last_hidden_state) < ATOL


def _params(module) -> dict[str, np.ndarray]:
  return {k: np.asarray(v[...]) for k, v in torch_io.iter_params(module)}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert sorted(pa) == sorted(pb)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_loads_pytorch_bin_directory(hf_model, hf_dir, ours, tmp_path):
  # transformers 5 writes safetensors even with safe_serialization=False, so the pickle that
  # older versions write is made by hand.
  torch.save(hf_model.state_dict(), tmp_path / torch_io.TORCH_SINGLE)
  os.symlink(os.path.join(hf_dir, "config.json"), tmp_path / "config.json")
  _assert_same_params(_loaded(str(tmp_path), scan_layers=ours.encoder.scan_layers), ours)


def test_loads_legacy_prefixed_vision_directory(hf_dir, ours, tmp_path):
  # transformers < 5 (and the released checkpoints) name the tensors "vision_model.<name>" and
  # store the position_ids buffer.
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  tensors = {f"vision_model.{k}": v for k, v in tensors.items()}
  tensors["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  os.symlink(os.path.join(hf_dir, "config.json"), tmp_path / "config.json")
  _assert_same_params(_loaded(str(tmp_path), scan_layers=ours.encoder.scan_layers), ours)


def test_loads_full_clip_model_directory(hf_model, tmp_path):
  cfg = _tiny_cfg()
  clip_config = transformers.CLIPConfig(
      vision_config=_hf_vision_config(cfg).to_dict(),
      text_config=dict(
          hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
          vocab_size=64, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
      ),
      projection_dim=8,
  )
  full = transformers.CLIPModel(clip_config).eval()
  _randomize(full, seed=2)
  full.save_pretrained(str(tmp_path))
  module = _loaded(str(tmp_path), cfg)
  ref, out = _run_both(full.vision_model, module, 32, 32, interpolate=False)
  _assert_parity(ref, out, num_layers=3)


def test_image_size_mismatch_without_interpolation(ours):
  with pytest.raises(ValueError, match=r"48x40.*image_size 32.*interpolate_pos_encoding"):
    ours(np.zeros((1, 48, 40, 3), np.float32))


def test_missing_tensor_names_key(hf_dir, tmp_path):
  missing = "encoder.layers.1.mlp.fc2.bias"
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  del tensors[missing]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  os.symlink(os.path.join(hf_dir, "config.json"), tmp_path / "config.json")
  with pytest.raises(torch_io.CheckpointError, match=missing):
    _loaded(str(tmp_path))


def test_unexpected_tensor_is_an_error(hf_dir, tmp_path):
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  tensors["encoder.layers.3.mlp.fc1.bias"] = np.zeros(64, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  os.symlink(os.path.join(hf_dir, "config.json"), tmp_path / "config.json")
  with pytest.raises(torch_io.CheckpointError, match="encoder.layers.3.mlp.fc1.bias"):
    _loaded(str(tmp_path))


def test_config_mismatch_names_field(hf_dir):
  hf = torch_io.read_config_json(hf_dir)
  from_hf = convert_clip.vision_config_from_hf(hf)
  assert from_hf == {k: _tiny_cfg()[k] for k in from_hf}
  with pytest.raises(ValueError, match="'layer_norm_eps'"):
    convert_clip.check_vision_config(_tiny_cfg(layer_norm_eps=1e-6), hf)
  with pytest.raises(ValueError, match="'num_heads'"):
    convert_clip.check_vision_config(_tiny_cfg(num_heads=2), {"vision_config": hf})


def test_full_config_parameter_count_matches_clip_vit_l14_336():
  cfg = config_lib.load_config("unires_pp_7b").model.vision
  hf_config = transformers.CLIPVisionConfig(
      hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
      image_size=336, patch_size=14, num_channels=3,
  )
  convert_clip.check_vision_config(cfg, hf_config.to_dict())
  with torch.device("meta"):
    reference = transformers.CLIPVisionModel(hf_config)
  expected = sum(p.numel() for p in reference.parameters())
  abstract = nnx.eval_shape(lambda: clip_vit.CLIPVisionTransformer(cfg, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == expected
  assert abstract.num_feature_tokens == 576


def test_export_loads_in_transformers_and_round_trips(ours, hf_model, tmp_path):
  cfg = _tiny_cfg()
  out = tmp_path / "vision_tower"
  convert_clip.save_clip_vision(ours, cfg, str(out))
  exported = transformers.CLIPVisionModel.from_pretrained(out).eval()
  assert exported.config.hidden_act == hf_model.config.hidden_act
  ref, mine = _run_both(exported, ours, 32, 32, interpolate=False, jit=True)
  _assert_parity(ref, mine, num_layers=3)
  back = _loaded(str(out), scan_layers=ours.encoder.scan_layers)
  imported = dict(torch_io.iter_params(back))
  for path, var in torch_io.iter_params(ours):
    np.testing.assert_array_equal(np.asarray(imported[path][...]), np.asarray(var[...]),
                                  err_msg=path)
