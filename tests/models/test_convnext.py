"""ConvNeXt E_h: parity with timm, open_clip nesting, drop path, errors, full size, export."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors
import safetensors.torch
import timm
import torch
from flax import nnx

from unires_jax import config_lib
from unires_jax.convert import torch_io
from unires_jax.convert.convnext import check_convnext_config
from unires_jax.convert.convnext import convnext_config_from_state
from unires_jax.convert.convnext import load_convnext
from unires_jax.convert.convnext import save_convnext
from unires_jax.convert.convnext import timm_name
from unires_jax.convert.convnext import timm_spec
from unires_jax.models.convnext import ConvNeXt
from unires_jax.models.convnext import drop_path_rates

ATOL = 1e-4  # float32, max abs error over the stage outputs
HEIGHT, WIDTH = 64, 96  # not square, so a height/width mix-up shows


def _cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = config_lib.load_config("tiny").model.convnext
  cfg.update(overrides)
  return cfg


def _timm_model(cfg, drop_path_rate=0.0) -> torch.nn.Module:
  """timm's ConvNeXt for `cfg`, every parameter (norms and layer scales too) randomised."""
  torch.manual_seed(0)
  model = timm.models.convnext.ConvNeXt(
      in_chans=cfg.in_chans, depths=tuple(cfg.depths), dims=tuple(cfg.dims),
      ls_init_value=0.5, drop_path_rate=drop_path_rate, num_classes=10)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gamma") or ".norm" in name or "downsample.0" in name or "stem.1" in name:
        p.copy_(0.5 + torch.rand_like(p))  # scales near 1, offsets away from 0
      else:
        p.copy_(torch.randn_like(p) * 0.1)
  return model.eval()


def _state(model) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _image(cfg, batch=2) -> np.ndarray:
  return np.random.default_rng(0).normal(size=(batch, HEIGHT, WIDTH, cfg.in_chans)).astype(
      np.float32)


def _timm_features(model, x) -> list[np.ndarray]:
  """timm's own stage outputs (NHWC) for NHWC `x`."""
  with torch.no_grad():
    feats = model.forward_intermediates(
        torch.from_numpy(x).permute(0, 3, 1, 2), intermediates_only=True)
  return [f.permute(0, 2, 3, 1).numpy() for f in feats]


def _ours(cfg, **kwargs) -> ConvNeXt:
  return ConvNeXt(cfg, rngs=nnx.Rngs(params=1, dropout=2), **kwargs)


def _assert_features_close(ours, theirs):
  assert len(ours) == len(theirs) == 4
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert a.shape == b.shape, (i, a.shape, b.shape)
    np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=0, err_msg=f"stage {i}")


@pytest.fixture(scope="module")
def timm_pair():
  cfg = _cfg()
  model = _timm_model(cfg)
  return cfg, model, _state(model), _timm_features(model, _image(cfg))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_matches_timm_from_file(timm_pair, tmp_path, suffix):
  cfg, model, _, expected = timm_pair
  path = str(tmp_path / f"convnext{suffix}")
  if suffix == ".safetensors":
    safetensors.torch.save_file(model.state_dict(), path)
  else:
    torch.save(model.state_dict(), path)
  ours = _ours(cfg)
  load_convnext(ours, path)
  out = ours(jnp.asarray(_image(cfg)))
  assert [o.shape[-1] for o in out] == list(ours.dims)
  assert [HEIGHT // o.shape[1] for o in out] == list(ours.strides) == [4, 8, 16, 32]
  _assert_features_close(out, expected)


def test_matches_timm_features_only_module(timm_pair):
  """The same weights in timm's features_only wrapper (what `features_only=True` builds)."""
  cfg, model, state, _ = timm_pair
  features = timm.models.FeatureListNet(
      model, out_indices=(0, 1, 2, 3), flatten_sequential=True)
  x = _image(cfg)
  with torch.no_grad():
    expected = [f.permute(0, 2, 3, 1).numpy()
                for f in features(torch.from_numpy(x).permute(0, 3, 1, 2))]
  ours = _ours(cfg)
  load_convnext(ours, state)
  _assert_features_close(ours(jnp.asarray(x)), expected)


def test_open_clip_nesting(timm_pair):
  cfg, _, state, expected = timm_pair
  nested = {f"visual.trunk.{k}": v for k, v in state.items()}
  nested["visual.head.proj.weight"] = np.zeros((8, cfg.dims[-1]), np.float32)
  nested["text.token_embedding.weight"] = np.zeros((5, 8), np.float32)
  nested["logit_scale"] = np.zeros((), np.float32)
  ours = _ours(cfg)
  load_convnext(ours, nested)
  _assert_features_close(ours(jnp.asarray(_image(cfg))), expected)

  explicit = _ours(cfg)
  load_convnext(explicit, {f"model.backbone.{k}": v for k, v in state.items()},
                prefix="model.backbone.")
  _assert_features_close(explicit(jnp.asarray(_image(cfg))), expected)


def test_open_clip_unknown_key_is_an_error(timm_pair):
  cfg, _, state, _ = timm_pair
  nested = {f"visual.trunk.{k}": v for k, v in state.items()}
  nested["decoder.weight"] = np.zeros((2,), np.float32)
  with pytest.raises(torch_io.CheckpointError, match="'decoder.weight'"):
    load_convnext(_ours(cfg), nested)


def test_drop_path(timm_pair):
  cfg, _, state, _ = timm_pair
  rate = 0.5
  x = jnp.asarray(_image(cfg, batch=4))
  reference = _ours(cfg)
  load_convnext(reference, state)
  want = reference(x)

  ours = _ours(_cfg(drop_path_rate=rate))
  load_convnext(ours, state)
  first, second = ours(x), ours(x)  # built in training mode, as nnx.Dropout is
  assert any(not np.array_equal(a, b) for a, b in zip(first, second))
  ours.eval()
  for a, b in zip(ours(x), want):
    np.testing.assert_array_equal(a, b)
  ours.train()
  assert any(not np.array_equal(a, b) for a, b in zip(ours(x), want))

  # Per-block rates follow timm's linspace over all blocks.
  timm_model = _timm_model(cfg, drop_path_rate=rate)
  expected = [[getattr(b.drop_path, "drop_prob", 0.0) for b in s.blocks] for s in timm_model.stages]
  np.testing.assert_allclose(
      sum(drop_path_rates(rate, tuple(cfg.depths)), []), sum(expected, []), atol=1e-6, rtol=0)
  ours_rates = [[b.drop_path.rate if b.drop_path is not None else 0.0 for b in s.blocks]
                for s in ours.stages]
  np.testing.assert_allclose(sum(ours_rates, []), sum(expected, []), atol=1e-6, rtol=0)


def test_drop_path_is_per_sample(timm_pair):
  """The last block (rate 0.9) drops its residual branch for whole samples, never in part."""
  cfg, _, state, _ = timm_pair
  ours = _ours(_cfg(drop_path_rate=0.9))
  load_convnext(ours, state)
  block = ours.stages[3].blocks[-1]
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 2, 3, cfg.dims[3])), jnp.float32)
  branch = block(x) - x
  kept = np.asarray(jnp.any(branch != 0, axis=(1, 2, 3)))
  dropped_everywhere = np.asarray(jnp.all(branch == 0, axis=(1, 2, 3)))
  np.testing.assert_array_equal(kept, ~dropped_everywhere)
  assert 0 < kept.sum() < len(kept)


def test_missing_tensor_names_it(timm_pair):
  cfg, _, state, _ = timm_pair
  for key in ("stages.2.blocks.1.mlp.fc1.weight", "stages.3.downsample.0.bias"):
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(torch_io.CheckpointError, match=f"'{key}'"):
      load_convnext(_ours(cfg), broken)


def test_config_from_state(timm_pair):
  cfg, _, state, _ = timm_pair
  inferred = convnext_config_from_state(state)
  assert inferred == {"in_chans": 3, "depths": (1, 1, 2, 1), "dims": (16, 32, 48, 64)}
  assert convnext_config_from_state({f"visual.trunk.{k}": v for k, v in state.items()}) == inferred
  check_convnext_config(cfg, inferred)
  with pytest.raises(ValueError, match="'depths'"):
    check_convnext_config(_cfg(depths=(1, 1, 3, 1)), inferred)
  with pytest.raises(ValueError, match="'dims'"):
    load_convnext(_ours(_cfg(dims=(16, 32, 48, 72))), state)


def test_bad_inputs():
  ours = _ours(_cfg())
  with pytest.raises(ValueError, match=r"\(1, 64, 64, 4\)"):
    ours(jnp.zeros((1, 64, 64, 4)))
  with pytest.raises(ValueError, match=r"\(1, 64, 80, 3\)"):
    ours(jnp.zeros((1, 64, 80, 3)))
  with pytest.raises(ValueError, match="image_size"):
    _ours(_cfg(image_size=70))


def test_logical_axes():
  ours = _ours(_cfg())
  params = dict(torch_io.iter_params(ours))
  for path, var in params.items():
    assert len(var.get_metadata()["out_sharding"]) == len(var.shape), path
  names = {path: var.get_metadata()["out_sharding"] for path, var in params.items()}
  block = "stages/1/blocks/0"
  assert names[f"{block}/conv_dw/kernel"] == ("conv_window", "conv_window", "conv_in", "conv_out")
  assert params[f"{block}/conv_dw/kernel"].shape == (7, 7, 1, 32)
  assert names[f"{block}/mlp/fc1/kernel"] == ("embed", "mlp")
  assert names[f"{block}/gamma"] == ("conv_out",)
  assert names["stages/1/downsample/0/scale"] == ("conv_out",)


def test_full_config_matches_timm_convnext_large():
  cfg = config_lib.load_config("unires_pp_7b").model.convnext
  try:
    with torch.device("meta"):
      reference = timm.create_model("convnext_large", features_only=True)
  except (RuntimeError, NotImplementedError):
    reference = timm.create_model("convnext_large", features_only=True)
  expected = sum(p.numel() for p in reference.parameters())
  abstract = nnx.eval_shape(lambda: ConvNeXt(cfg, rngs=nnx.Rngs(0)))
  ours = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert ours == expected
  assert abstract.dims == tuple(i["num_chs"] for i in reference.feature_info.get_dicts())
  assert abstract.strides == tuple(i["reduction"] for i in reference.feature_info.get_dicts())


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_export_loads_in_timm_and_round_trips(tmp_path, scan_layers):
  """Scanned blocks (stacked per stage) export under timm's per-block names and import back."""
  cfg = _cfg()
  ours = _ours(cfg, scan_layers=scan_layers)
  out = tmp_path / "high_res_encoder"
  save_convnext(ours, str(out))
  spec = json.loads((out / "config.json").read_text())
  with safetensors.safe_open(out / "model.safetensors", framework="pt") as f:
    assert json.loads(f.metadata()["model_args"]) == spec["model_args"]
  theirs = timm.create_model(spec["timm_model"], pretrained=False, num_classes=0,
                             **spec["model_args"]).eval()
  result = theirs.load_state_dict(safetensors.torch.load_file(out / "model.safetensors"),
                                  strict=False)
  assert not result.unexpected_keys
  assert sorted(result.missing_keys) == ["head.norm.bias", "head.norm.weight"]  # the classifier
  x = _image(cfg)
  _assert_features_close([np.asarray(f) for f in ours(x)], _timm_features(theirs, x))
  back = ConvNeXt(cfg, scan_layers=scan_layers, rngs=nnx.Rngs(params=7, dropout=2))
  load_convnext(back, str(out / "model.safetensors"))
  imported = dict(torch_io.iter_params(back))
  for path, var in torch_io.iter_params(ours):
    np.testing.assert_array_equal(np.asarray(imported[path][...]), np.asarray(var[...]),
                                  err_msg=path)


def test_known_sizes_export_under_their_timm_names():
  assert timm_name((3, 3, 27, 3), (192, 384, 768, 1536)) == "convnext_large"
  assert timm_name([3, 3, 9, 3], [96, 192, 384, 768]) == "convnext_tiny"
  assert timm_spec(_cfg())["timm_model"] == "convnext_tiny"  # with its own depths / dims


def test_scanned_blocks_are_the_unrolled_blocks_stacked(timm_pair):
  """The same rngs give the unrolled parameters stacked per stage (leading axis `layers`); the
  scanned trunk loads timm's weights and gives timm's features."""
  cfg, _, state, expected = timm_pair
  unrolled, scanned = _ours(cfg), _ours(cfg, scan_layers=True)
  flat = dict(torch_io.iter_params(unrolled))
  for path, var in torch_io.iter_params(scanned):
    if "/blocks/" not in path:
      np.testing.assert_array_equal(var[...], flat[path][...], err_msg=path)
      continue
    assert var.get_metadata()["out_sharding"][0] == "layers", path
    stage, rest = path.split("/blocks/")
    depth = cfg.depths[int(stage.split("/")[-1])]
    assert var.shape[0] == depth, path
    for j in range(depth):
      np.testing.assert_array_equal(var[...][j], flat[f"{stage}/blocks/{j}/{rest}"][...])
  load_convnext(scanned, state)
  _assert_features_close(scanned(jnp.asarray(_image(cfg))), expected)


def test_scanned_blocks_refuse_stochastic_depth():
  with pytest.raises(ValueError, match=r"drop_path_rate 0.1 > 0 needs unrolled blocks"):
    _ours(_cfg(drop_path_rate=0.1), scan_layers=True)
