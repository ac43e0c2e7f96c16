"""RoIAlign and its mean over bins against a plain float64 NumPy transcription of the definition
and against torchvision."""

import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest
import torch
import torchvision

from unires_jax.models import roi_align as roi_align_lib

HEIGHT, WIDTH = 7, 9
SCALE = 0.5  # stride 2: boxes live on a 14 x 18 image


def _bilinear(fmap, y, x):
  """torchvision's bilinear_interpolate for one sample; fmap [h, w, c]."""
  height, width = fmap.shape[:2]
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(fmap.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * fmap[y_low, x_low] + hy * lx * fmap[y_low, x_high]
          + ly * hx * fmap[y_high, x_low] + ly * lx * fmap[y_high, x_high])


def _roi_align_numpy(features, boxes, out_h, out_w, scale, ratio, aligned):
  features = np.asarray(features, np.float64)
  boxes = np.asarray(boxes, np.float64)
  batch, num_boxes = boxes.shape[:2]
  out = np.zeros((batch, num_boxes, out_h, out_w, features.shape[-1]))
  offset = 0.5 if aligned else 0.0
  for b in range(batch):
    for n in range(num_boxes):
      x1, y1, x2, y2 = boxes[b, n] * scale - offset
      roi_w, roi_h = x2 - x1, y2 - y1
      if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
      bin_h, bin_w = roi_h / out_h, roi_w / out_w
      for ph in range(out_h):
        for pw in range(out_w):
          acc = 0.0
          for iy in range(ratio):
            y = y1 + ph * bin_h + (iy + 0.5) * bin_h / ratio
            for ix in range(ratio):
              x = x1 + pw * bin_w + (ix + 0.5) * bin_w / ratio
              acc = acc + _bilinear(features[b], y, x)
          out[b, n, ph, pw] = acc / (ratio * ratio)
  return out


def _random_boxes(rng, batch, num_boxes):
  """Boxes inside, crossing the border of, and entirely outside a 14 x 18 image; some degenerate."""
  img_h, img_w = HEIGHT / SCALE, WIDTH / SCALE
  x1 = rng.uniform(-6, img_w + 2, (batch, num_boxes))
  y1 = rng.uniform(-6, img_h + 2, (batch, num_boxes))
  w = rng.uniform(0, 12, (batch, num_boxes))
  h = rng.uniform(0, 10, (batch, num_boxes))
  boxes = np.stack([x1, y1, x1 + w, y1 + h], -1)
  boxes[0, 0] = [-20, -15, -8, -6]                    # entirely outside (above-left)
  boxes[0, 1] = [img_w + 4, 2, img_w + 9, 8]          # entirely outside (right)
  boxes[1, 0] = [-3, -3, img_w + 3, img_h + 3]        # crosses every border
  boxes[1, 1] = [5, 5, 5, 5]                          # a point
  return boxes.astype(np.float32)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("output_size,ratio", [(3, 2), ((2, 4), 1), (4, 3)])
def test_matches_numpy_definition(aligned, output_size, ratio):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, HEIGHT, WIDTH, 3)).astype(np.float32)
  boxes = _random_boxes(rng, 2, 6)
  got = roi_align_lib.roi_align(
      jnp.asarray(features), jnp.asarray(boxes), output_size=output_size, spatial_scale=SCALE,
      sampling_ratio=ratio, aligned=aligned)
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  want = _roi_align_numpy(features, boxes, out_h, out_w, SCALE, ratio, aligned)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  assert np.abs(want[0, :2]).max() == 0.0  # boxes outside the image pool zeros
  mean = roi_align_lib.roi_align_mean(
      jnp.asarray(features), jnp.asarray(boxes), output_size=output_size, spatial_scale=SCALE,
      sampling_ratio=ratio, aligned=aligned)
  assert mean.shape == (2, 6, 3)
  np.testing.assert_allclose(np.asarray(mean), want.mean(axis=(2, 3)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("aligned", [True, False])
def test_matches_torchvision(aligned):
  rng = np.random.default_rng(1)
  features = rng.normal(size=(2, HEIGHT, WIDTH, 5)).astype(np.float32)
  boxes = _random_boxes(rng, 2, 8)
  got = roi_align_lib.roi_align(
      jnp.asarray(features), jnp.asarray(boxes), output_size=(3, 4), spatial_scale=SCALE,
      sampling_ratio=2, aligned=aligned)
  rois = torch.cat([
      torch.cat([torch.full((8, 1), float(b)), torch.from_numpy(boxes[b])], 1) for b in range(2)])
  want = torchvision.ops.roi_align(
      torch.from_numpy(features).permute(0, 3, 1, 2), rois, output_size=(3, 4),
      spatial_scale=SCALE, sampling_ratio=2, aligned=aligned)
  want = want.permute(0, 2, 3, 1).reshape(2, 8, 3, 4, 5).numpy()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  mean = roi_align_lib.roi_align_mean(
      jnp.asarray(features), jnp.asarray(boxes), output_size=(3, 4), spatial_scale=SCALE,
      sampling_ratio=2, aligned=aligned)
  np.testing.assert_allclose(np.asarray(mean), want.mean(axis=(2, 3)), atol=1e-5, rtol=0)


def test_bfloat16_features_pool_in_bfloat16():
  """bfloat16 features (the TPU recipe): the result's dtype, within bfloat16 rounding of the
  float32 pooling of the same values."""
  rng = np.random.default_rng(4)
  features = jnp.asarray(rng.normal(size=(2, HEIGHT, WIDTH, 4)), jnp.bfloat16)
  boxes = jnp.asarray(_random_boxes(rng, 2, 6))
  kwargs = dict(output_size=3, spatial_scale=SCALE, sampling_ratio=2)
  for fn in (roi_align_lib.roi_align, roi_align_lib.roi_align_mean):
    got = fn(features, boxes, **kwargs)
    assert got.dtype == jnp.bfloat16
    want = fn(features.astype(jnp.float32), boxes, **kwargs)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.03, rtol=0.02)


def test_jit_matches_eager():
  rng = np.random.default_rng(2)
  features = jnp.asarray(rng.normal(size=(2, HEIGHT, WIDTH, 3)), jnp.float32)
  boxes = jnp.asarray(_random_boxes(rng, 2, 4))
  kwargs = dict(output_size=2, spatial_scale=SCALE, sampling_ratio=2)
  jitted = jax.jit(lambda f, b: roi_align_lib.roi_align(f, b, **kwargs))(features, boxes)
  np.testing.assert_allclose(
      np.asarray(jitted), np.asarray(roi_align_lib.roi_align(features, boxes, **kwargs)),
      atol=1e-6, rtol=0)


def test_gradient_wrt_features():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    features = jnp.asarray(rng.normal(size=(2, HEIGHT, WIDTH, 2)), jnp.float64)
    boxes = jnp.asarray(_random_boxes(rng, 2, 4), jnp.float64)
    for pool in (roi_align_lib.roi_align, roi_align_lib.roi_align_mean):
      fn = lambda f, pool=pool: pool(
          f, boxes, output_size=2, spatial_scale=SCALE, sampling_ratio=2)
      jtu.check_grads(fn, (features,), order=1, modes=("rev",))
      assert jnp.abs(jax.grad(lambda f, fn=fn: fn(f).sum())(features)).max() > 0


def test_reversed_box_names_its_index():
  boxes = np.zeros((2, 3, 4), np.float32)
  boxes[..., 2:] = 4.0
  boxes[1, 2] = [6.0, 1.0, 2.0, 3.0]
  with pytest.raises(ValueError, match=r"boxes\[1, 2\]"):
    roi_align_lib.roi_align(
        jnp.zeros((2, HEIGHT, WIDTH, 1)), jnp.asarray(boxes), output_size=2, spatial_scale=1.0,
        sampling_ratio=2)


def test_rejects_adaptive_sampling():
  with pytest.raises(ValueError, match="sampling_ratio"):
    roi_align_lib.roi_align(
        jnp.zeros((1, HEIGHT, WIDTH, 1)), jnp.zeros((1, 1, 4)), output_size=2, spatial_scale=1.0,
        sampling_ratio=0)
