"""OWLv2 detector: parity with transformers.Owlv2ForObjectDetection (weights through the importer),
post-processing, preprocessing and NMS against transformers / torchvision, full-size counts."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torchvision  # pylint: disable=g-import-not-at-top,wrong-import-position

from tests.owlv2_files import hf_config  # pylint: disable=g-import-not-at-top
from unires_jax import parallel  # pylint: disable=g-import-not-at-top
from unires_jax.config_lib import load_config  # pylint: disable=g-import-not-at-top
from unires_jax.convert import owlv2 as convert_owlv2  # pylint: disable=g-import-not-at-top
from unires_jax.models import detection  # pylint: disable=g-import-not-at-top
from unires_jax.models import owlv2  # pylint: disable=g-import-not-at-top

ATOL = 1e-4  # float32 on both sides; the compared values are of magnitude ~1 (logits < ~10).
BATCH, QUERIES, TOKENS = 2, 3, 6
EOT = 99  # the largest id in the tiny vocabulary of 100: where the text tower pools


def _second_cfg() -> ml_collections.ConfigDict:
  """Another image size, patch size and widths: 48 x 48 images, 3 x 3 patches of 16."""
  cfg = owlv2.tiny()
  cfg.vision.update(image_size=48, patch_size=16, hidden_size=16, intermediate_size=40,
                    num_heads=2, num_layers=1)
  cfg.text.update(hidden_size=32, intermediate_size=48, num_heads=4)
  cfg.projection_dim = 32
  return cfg


CONFIGS = {"tiny": owlv2.tiny, "second": _second_cfg}


def _queries(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """[BATCH, QUERIES, TOKENS] ids and mask: start token, text, end token (EOT), padding 0; query
  lengths differ, and query (1, 2) starts with 0 (a padding query, masked in the logits)."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((BATCH, QUERIES, TOKENS), np.int64)
  mask = np.zeros_like(ids)
  for b in range(BATCH):
    for q in range(QUERIES):
      n = 3 + (b + q) % (TOKENS - 2)  # 3..TOKENS tokens, EOT last
      ids[b, q, :n] = [EOT - 1, *rng.integers(1, EOT - 1, n - 2), EOT]
      mask[b, q, :n] = 1
  ids[1, 2, 0] = 0
  return ids, mask


def _hf_model(cfg, seed: int) -> "transformers.Owlv2ForObjectDetection":
  torch.manual_seed(seed)
  model = transformers.Owlv2ForObjectDetection(hf_config(cfg, eos_token_id=EOT)).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  # Matrices drawn anew with std 1 / sqrt(fan_in) (transformers initialises the heads with std 1,
  # which makes logits of ~100 where float32 rounding alone exceeds ATOL), and every vector and
  # scalar moved by 0.1 so that each bias and norm parameter matters.
  with torch.no_grad():
    for p in model.parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim < 2:
        p.add_(0.1 * noise)
      else:
        p.copy_(noise / p[0].numel() ** 0.5)
  return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  """(config, transformers model, our model imported from its save_pretrained directory)."""
  cfg = CONFIGS[request.param]()
  hf_model = _hf_model(cfg, seed=len(request.param))
  model_dir = str(tmp_path_factory.mktemp(f"owlv2_{request.param}"))
  hf_model.save_pretrained(model_dir)
  ours = owlv2.Owlv2ForObjectDetection(cfg, rngs=nnx.Rngs(0))
  convert_owlv2.load_owlv2(ours, model_dir, cfg=cfg)
  return cfg, hf_model, ours


@nnx.jit(static_argnames="interpolate_pos_encoding")
def _forward(model, pixels, ids, mask, interpolate_pos_encoding=False):
  return model(pixels, ids, mask, interpolate_pos_encoding=interpolate_pos_encoding)


def _run_both(hf_model, ours, height, width, interpolate=False):
  pixels = np.random.default_rng(height + width).normal(size=(BATCH, 3, height, width))
  pixels = pixels.astype(np.float32)
  ids, mask = _queries(height)
  with torch.no_grad():
    kw = dict(input_ids=torch.from_numpy(ids.reshape(-1, TOKENS)),
              attention_mask=torch.from_numpy(mask.reshape(-1, TOKENS)),
              pixel_values=torch.from_numpy(pixels), interpolate_pos_encoding=interpolate)
    ref = hf_model(**kw)
    ref_clip = hf_model.owlv2(**kw)
  out = _forward(ours, pixels.transpose(0, 2, 3, 1), ids, mask, interpolate)
  return ref, ref_clip, jax.tree.map(np.asarray, out)


def _assert_close(name, ours, ref):
  ref = ref.numpy()
  assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
  err = np.max(np.abs(ours - ref))
  assert err < ATOL, f"{name}: max abs error {err}"


def _assert_parity(ref, ref_clip, out, grid):
  patches = grid[0] * grid[1]
  assert out["logits"].shape == (BATCH, patches, QUERIES)
  assert out["image_embeds"].shape[:3] == (BATCH, *grid)
  # The padding query's logits are float32's lowest value on both sides, the others finite.
  lowest = np.finfo(np.float32).min
  assert np.all(out["logits"][1, :, 2] == lowest) and np.all(ref.logits[1, :, 2].numpy() == lowest)
  assert np.isfinite(out["logits"][0]).all()
  for name in ("logits", "objectness_logits", "pred_boxes", "image_embeds", "class_embeds",
               "text_embeds"):
    _assert_close(name, out[name], getattr(ref, name))
  _assert_close("logits_per_image", out["logits_per_image"], ref_clip.logits_per_image)


def test_matches_transformers_at_config_size(pair):
  cfg, hf_model, ours = pair
  size = cfg.vision.image_size
  ref, ref_clip, out = _run_both(hf_model, ours, size, size)
  _assert_parity(ref, ref_clip, out, (size // cfg.vision.patch_size,) * 2)


def test_matches_transformers_at_another_size(pair):
  # Bicubic position embeddings and the box bias of the input's own (non-square) grid.
  cfg, hf_model, ours = pair
  patch = cfg.vision.patch_size
  ref, ref_clip, out = _run_both(hf_model, ours, 5 * patch, 3 * patch, interpolate=True)
  _assert_parity(ref, ref_clip, out, (5, 3))


def test_box_bias_matches_transformers():
  for grid in ((4, 4), (5, 3), (60, 60)):
    want = transformers.Owlv2ForObjectDetection.compute_box_bias(
        transformers.Owlv2ForObjectDetection, *grid).numpy()
    np.testing.assert_allclose(owlv2.box_bias(grid), want, rtol=0, atol=1e-6)


def _processor():
  return transformers.Owlv2ImageProcessor()


def test_postprocess_equals_transformers(pair):
  cfg, hf_model, ours = pair
  size = cfg.vision.image_size
  ref, _, _ = _run_both(hf_model, ours, size, size)
  scores = torch.sigmoid(ref.logits.max(-1).values)
  threshold = float(scores[:, :].median())  # keeps about half
  for target_sizes in (None, [(480, 640), (333, 250)]):
    want = _processor().post_process_object_detection(ref, threshold, target_sizes)
    got = detection.postprocess(ref.logits.numpy(), ref.pred_boxes.numpy(), threshold,
                                target_sizes)
    for w, g in zip(want, got):
      assert 0 < len(g["scores"]) < ref.logits.shape[1]
      np.testing.assert_array_equal(g["labels"], w["labels"].numpy())
      np.testing.assert_allclose(g["scores"], w["scores"].numpy(), rtol=1e-6, atol=0)
      np.testing.assert_allclose(g["boxes"], w["boxes"].numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("height,width,size",
                         [(50, 70, 32), (20, 12, 48), (96, 40, 24), (480, 640, 960),
                          (1200, 900, 960)])
def test_preprocess_matches_transformers_processor(height, width, size):
  # transformers 5 pads with 0.0; the 0.5 gray default is checked below. Both sides blur and
  # resample in float32 at the same sampling positions but sum in different orders: float32
  # rounding of values in [0, 1] (~6e-8 a step) divided by std (~0.27). Seen: <= 1e-6 at every
  # size here; the tolerance allows 5x that.
  image = np.random.default_rng(height).integers(0, 256, (height, width, 3), np.uint8)
  processor = transformers.Owlv2ImageProcessor(size={"height": size, "width": size})
  want = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  got = detection.owlv2_preprocess(image, size, pad_value=0.0)
  assert got.shape == want.shape == (size, size, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-6)


def test_preprocess_pads_bottom_right_with_gray():
  image = np.full((20, 10, 3), 255, np.uint8)  # white, taller than wide: padded on the right
  out = detection.owlv2_preprocess(image, 40)  # upscaling by 2: no blur
  gray = (detection.OWLV2_PAD_VALUE - detection.OWLV2_MEAN) / detection.OWLV2_STD
  white = (1.0 - detection.OWLV2_MEAN) / detection.OWLV2_STD
  np.testing.assert_allclose(out[:, 22:], np.broadcast_to(gray, (40, 18, 3)), atol=1e-6)
  np.testing.assert_allclose(out[:, :18], np.broadcast_to(white, (40, 18, 3)), atol=1e-6)


def _random_boxes(rng, n):
  xy = rng.uniform(0, 80, (n, 2))
  return np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], -1).astype(np.float32)


@pytest.mark.parametrize("iou_threshold", [0.1, 0.3, 0.7])
def test_nms_matches_torchvision(iou_threshold):
  rng = np.random.default_rng(int(iou_threshold * 10))
  boxes = _random_boxes(rng, 200)
  scores = rng.permutation(200).astype(np.float32) / 200  # distinct: one order on both sides
  want = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou_threshold)
  got = detection.nms(boxes, scores, iou_threshold)
  assert 0 < len(got) < 200
  np.testing.assert_array_equal(got, want.numpy())
  np.testing.assert_array_equal(detection.nms(boxes, scores, iou_threshold, max_keep=5), got[:5])


def test_objectness_proposals_are_top_k_after_nms():
  rng = np.random.default_rng(0)
  n, k, size = 64, 6, (300, 200)
  cxcywh = np.concatenate([rng.uniform(0.1, 0.9, (n, 2)), rng.uniform(0.05, 0.5, (n, 2))], -1)
  logits = rng.normal(size=n).astype(np.float32) * 3
  logits[5] = -10.0  # below min_score
  cxcywh[7] = [0.9, 0.1, 0.05, 0.05]  # in the padding right of the 200-wide image: dropped
  got = detection.objectness_proposals(logits, cxcywh, k=k, iou_threshold=0.3, min_score=0.01,
                                       target_size=size)
  assert got["boxes"].shape == (k, 4) and got["scores"].shape == (k,)
  assert np.all(np.diff(got["scores"]) <= 0)
  # The same selection from torchvision's NMS over the clipped pixel boxes.
  boxes = np.clip(detection.center_to_corners(cxcywh.astype(np.float32)) * 300, 0,
                  [200, 300, 200, 300]).astype(np.float32)
  scores = 1 / (1 + np.exp(-logits))
  nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  valid = np.flatnonzero((scores > 0.01) & nonempty)
  assert 5 not in valid and 7 not in valid
  want = valid[torchvision.ops.nms(torch.from_numpy(boxes[valid]),
                                   torch.from_numpy(scores[valid].astype(np.float32)), 0.3)[:k]]
  np.testing.assert_allclose(got["boxes"], boxes[want], atol=1e-4)
  assert np.all(got["boxes"][:, 2] <= 200) and np.all(got["boxes"][:, 3] <= 300)


# The released configs' fields (config.json of google/owlv2-base-patch16-ensemble and
# google/owlv2-large-patch14-ensemble; the other fields are transformers' defaults).
RELEASED = {
    "base_patch16": dict(
        projection_dim=512,
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                         num_hidden_layers=12, max_position_embeddings=16, vocab_size=49408),
        vision_config=dict(image_size=960, patch_size=16, hidden_size=768,
                           intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)),
    "large_patch14": dict(
        projection_dim=768,
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                         num_hidden_layers=12, max_position_embeddings=16, vocab_size=49408),
        vision_config=dict(image_size=1008, patch_size=14, hidden_size=1024,
                           intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24)),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_full_size_parameter_count_matches_transformers(name):
  cfg = getattr(owlv2, name)()
  released = transformers.Owlv2Config(**RELEASED[name])
  convert_owlv2.check_config(cfg, released.to_dict())
  with torch.device("meta"):
    reference = transformers.Owlv2ForObjectDetection(released)
  expected = sum(p.numel() for p in reference.parameters())
  abstract = nnx.eval_shape(lambda: owlv2.Owlv2ForObjectDetection(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == expected
  # Every parameter has logical axis names that the mesh rules resolve.
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
  parallel.state_shardings(params, mesh, parallel.rules_from_config(load_config("tiny")))
