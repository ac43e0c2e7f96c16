"""Mask decoder on the tiny config: shapes, jit, gradients, query masking, level schedule."""

import math

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.train.test_remat import _unstacked
from unires_jax import config_lib
from unires_jax.models import mask_decoder as md

LLM_WIDTH = 64
IN_DIMS = (16, 32, 48, 64)
IMAGE = 64  # stage maps 16, 8, 4, 2 pixels wide
NUM_SEG, NUM_REGIONS = 1, 6
LOGICAL_AXES = {"embed", "mlp", "heads", "position", "conv_window", "conv_in", "conv_out"}


def _cfg(**overrides):
  cfg = config_lib.load_config("tiny").model.mask_decoder
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def _inputs(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  features = [jnp.asarray(rng.normal(size=(batch, IMAGE // s, IMAGE // s, d)), jnp.float32)
              for s, d in zip((4, 8, 16, 32), IN_DIMS)]
  seg = jnp.asarray(rng.normal(size=(batch, NUM_SEG, LLM_WIDTH)), jnp.float32)
  regions = jnp.asarray(rng.normal(size=(batch, NUM_REGIONS, LLM_WIDTH)), jnp.float32)
  valid = np.ones((batch, NUM_REGIONS), bool)
  valid[0, 3:] = False
  valid[1, 1] = False
  return features, seg, regions, jnp.asarray(valid)


@nnx.jit
def _run(model, features, seg, regions, valid):
  return model(features, seg, regions, valid)


def _abstract(**overrides):
  """A decoder with shapes but no values, for tests that only trace."""
  return nnx.eval_shape(
      lambda: md.MaskDecoder(LLM_WIDTH, IN_DIMS, _cfg(**overrides), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def model():
  return md.MaskDecoder(LLM_WIDTH, IN_DIMS, _cfg(), rngs=nnx.Rngs(0))


def test_output_shapes_under_jit(model):
  cfg = _cfg()
  out = _run(model, *_inputs())
  assert out.mask_logits.shape == (2, NUM_SEG, IMAGE // 4, IMAGE // 4)
  assert out.mask_logits.dtype == jnp.float32
  assert len(out.aux_mask_logits) == cfg.num_layers
  assert all(a.shape == out.mask_logits.shape for a in out.aux_mask_logits)
  assert out.seg_queries.shape == (2, NUM_SEG, cfg.hidden_dim)
  assert np.isfinite(np.asarray(out.mask_logits)).all()


def test_without_aux_loss_returns_no_aux_predictions():
  decoder = _abstract(aux_loss=False)
  out = nnx.eval_shape(lambda m, *a: m(*a), decoder, *_inputs())
  assert out.aux_mask_logits == []
  assert out.mask_logits.shape == (2, NUM_SEG, IMAGE // 4, IMAGE // 4)


def test_every_parameter_has_logical_axes(model):
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      names = var.get_metadata().get("out_sharding")
      assert names is not None and len(names) == var.ndim, path
      assert set(names) <= LOGICAL_AXES, (path, names)
      distinct = [n for n in names if n != "conv_window"]  # a conv kernel's two window dims
      assert len(set(distinct)) == len(distinct), (path, names)


def test_gradients_are_finite_and_reach_every_parameter(model):
  features, seg, regions, valid = _inputs(2)
  weights = jnp.asarray(np.random.default_rng(3).normal(size=(2, NUM_SEG, 16, 16)), jnp.float32)

  def loss(m):
    out = m(features, seg, regions, valid)
    return sum(jnp.sum(weights * p) for p in [out.mask_logits, *out.aux_mask_logits])

  grads = nnx.jit(nnx.grad(loss))(model)
  flat = {"/".join(map(str, path)): np.asarray(g) for path, g in nnx.to_flat_state(grads)}
  assert len(flat) == len([v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)])
  scale = max(np.abs(g).max() for g in flat.values())
  for name, g in flat.items():
    assert np.isfinite(g).all(), name
    if name.endswith("k_proj/bias"):
      # A key bias shifts every score of a query equally: softmax cancels it.
      assert np.abs(g).max() < 1e-5 * scale, name
    else:
      assert np.abs(g).max() > 0, name


def test_scanned_layers_equal_unrolled():
  """`scan_layers`: the same decoder (same seed) with its layers stacked, 7 layers = a scan of 2
  rounds over the 3 levels + 1 layer unrolled, gives the unrolled one's predictions and
  gradients (float32 rounding: the scan's fusions differ)."""
  cfg = _cfg(num_layers=7)
  unrolled = md.MaskDecoder(LLM_WIDTH, IN_DIMS, cfg, rngs=nnx.Rngs(0))
  scanned = md.MaskDecoder(LLM_WIDTH, IN_DIMS, cfg, scan_layers=True, rngs=nnx.Rngs(0))
  assert scanned.transformer_ffn_layers.linear1.kernel[...].shape == (7, cfg.hidden_dim,
                                                                       cfg.ffn_dim)
  inputs = _inputs(4)
  weights = jnp.asarray(np.random.default_rng(5).normal(size=(2, NUM_SEG, 16, 16)), jnp.float32)

  def loss(m):
    out = m(*inputs)
    return sum(jnp.sum(weights * p) for p in [out.mask_logits, *out.aux_mask_logits]), out

  def gradients(m):  # by unrolled path: a stacked gradient once per layer
    grads, out = nnx.jit(nnx.grad(loss, has_aux=True))(m)
    return _unstacked({"/".join(map(str, path)): np.asarray(g)
                       for path, g in nnx.to_flat_state(grads)}), out

  g_ref, ref = gradients(unrolled)
  g, out = gradients(scanned)
  assert len(out.aux_mask_logits) == len(ref.aux_mask_logits) == 7
  for got, want in zip([out.mask_logits, *out.aux_mask_logits],
                       [ref.mask_logits, *ref.aux_mask_logits]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert g.keys() == g_ref.keys()
  assert "transformer_ffn_layers/6/linear1/kernel" in g  # the unrolled last layer's
  diff = np.sqrt(sum(np.sum((g[k] - g_ref[k]) ** 2) for k in g_ref))
  norm = np.sqrt(sum(np.sum(x ** 2) for x in g_ref.values()))
  assert diff <= 1e-5 * norm, f"gradients differ by {diff / norm:.2e} of their norm"


def test_invalid_region_queries_do_not_affect_seg_output(model):
  features, seg, regions, valid = _inputs(4)
  base = _run(model, features, seg, regions, valid)
  noise = jnp.asarray(np.random.default_rng(5).normal(size=regions.shape) * 10, jnp.float32)
  changed = _run(model, features, seg, jnp.where(valid[..., None], regions, noise), valid)
  for a, b in zip([base.mask_logits, base.seg_queries, *base.aux_mask_logits],
                  [changed.mask_logits, changed.seg_queries, *changed.aux_mask_logits]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)
  # Valid region queries do take part.
  moved = _run(model, features, seg, regions + noise, valid)
  assert np.abs(np.asarray(moved.mask_logits - base.mask_logits)).max() > 1e-3


def test_region_inputs_ignored_without_region_queries():
  decoder = md.MaskDecoder(
      LLM_WIDTH, IN_DIMS, _cfg(use_region_queries=False), rngs=nnx.Rngs(0))
  assert not hasattr(decoder, "region_proj")
  features, seg, regions, valid = _inputs(6)
  with_regions = _run(decoder, features, seg, regions, valid)
  without = nnx.jit(lambda m, f, s: m(f, s))(decoder, features, seg)
  np.testing.assert_array_equal(
      np.asarray(with_regions.mask_logits), np.asarray(without.mask_logits))


def test_layers_attend_to_the_configured_levels(monkeypatch):
  decoder = _abstract(num_layers=4, feature_levels=(3, 1, 2))
  calls = []
  original = md.fine_grained_cross_attention

  def recording(q, k, v, mask_logits, key_valid=None, *, impl):
    calls.append((k.shape[2], mask_logits.shape, impl))
    return original(q, k, v, mask_logits, key_valid, impl=impl)

  monkeypatch.setattr(md, "fine_grained_cross_attention", recording)
  nnx.eval_shape(lambda m, *a: m(*a), decoder, *_inputs(7))
  widths = [IMAGE // 4 // 2**decoder.level_of_layer(l) for l in range(4)]
  assert widths == [2, 8, 4, 2]  # levels 3, 1, 2, then cycling back to 3
  num_queries = NUM_SEG + NUM_REGIONS
  assert calls == [(w * w, (2, num_queries, w * w), "xla") for w in widths]


def test_rejects_bad_config():
  with pytest.raises(ValueError, match="feature_levels"):
    md.MaskDecoder(LLM_WIDTH, IN_DIMS, _cfg(feature_levels=(4,)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="cross_attention_impl"):
    md.MaskDecoder(LLM_WIDTH, IN_DIMS, _cfg(cross_attention_impl="cuda"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("size", [(2, 2), (4, 4), (5, 3), (16, 16)])
def test_resize_mask_logits_matches_torch_bilinear(size):
  x = np.random.default_rng(8).normal(size=(2, 3, 16, 16)).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x), size=size, mode="bilinear", align_corners=False).numpy()
  got = md.resize_mask_logits(jnp.asarray(x), size)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("in_hw,out_hw", [((2, 2), (4, 4)), ((3, 2), (7, 5))])
def test_resize_nearest_matches_torch(in_hw, out_hw):
  x = np.random.default_rng(9).normal(size=(1, *in_hw, 2)).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="nearest").permute(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(md.resize_nearest(jnp.asarray(x), out_hw)), want.numpy())


def test_sine_position_encoding_matches_mask2former():
  """Transcription of Mask2Former's PositionEmbeddingSine(num_pos_feats, normalize=True)."""
  h, w, dim = 3, 5, 16
  feats, eps, scale = dim // 2, 1e-6, 2 * math.pi
  not_mask = torch.ones(1, h, w)
  y_embed = not_mask.cumsum(1, dtype=torch.float32)
  x_embed = not_mask.cumsum(2, dtype=torch.float32)
  y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
  x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
  dim_t = torch.arange(feats, dtype=torch.float32)
  dim_t = 10000 ** (2 * (dim_t // 2) / feats)
  pos_x = x_embed[:, :, :, None] / dim_t
  pos_y = y_embed[:, :, :, None] / dim_t
  pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
  pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
  want = torch.cat((pos_y, pos_x), dim=3)[0].numpy()
  np.testing.assert_allclose(
      np.asarray(md.sine_position_encoding(h, w, dim)), want, atol=1e-5, rtol=0)


def test_group_norm_matches_torch():
  x = np.random.default_rng(10).normal(size=(2, 3, 4, 16)).astype(np.float32) * 3 + 1
  norm = md.group_norm(16, 4, dtype=None, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  want = torch.nn.GroupNorm(4, 16)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  np.testing.assert_allclose(
      np.asarray(norm(jnp.asarray(x))), want.detach().numpy(), atol=1e-5, rtol=0)
