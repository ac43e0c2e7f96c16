"""RoIAlign (Mask R-CNN) as matrix products, so that it jits, differentiates and runs on the MXU.

Follows the torchvision / detectron2 kernel exactly: each output bin averages
`sampling_ratio x sampling_ratio` bilinear samples at the bin's regular sub-grid centres. A sample
with y < -1 or y > height (x likewise) contributes 0; otherwise its coordinate is clamped to
[0, size - 1] before interpolation. The adaptive sampling ratio (`sampling_ratio <= 0` in
torchvision) depends on the box sizes, so it has no static shape and is not supported.

UniRES++ uses `roi_align_mean`, each box's bins averaged into one feature vector.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _output_hw(output_size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(output_size, int):
    output_size = (output_size, output_size)
  out_h, out_w = (int(s) for s in output_size)
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f"output_size must be positive, got {output_size}")
  return out_h, out_w


def check_boxes(boxes: jax.Array, valid: jax.Array | None = None, name: str = "boxes") -> None:
  """Raises if a concrete box has x2 < x1 or y2 < y1; traced boxes are the caller's to check.

  Args:
    boxes: [batch, num_boxes, 4] (x1, y1, x2, y2).
    valid: [batch, num_boxes] bool; boxes marked False (padding slots) are not checked.
    name: how the error names the array, e.g. "batch['object_boxes']".
  """
  if isinstance(boxes, jax.core.Tracer) or isinstance(valid, jax.core.Tracer):
    return
  boxes = np.asarray(boxes)
  bad = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
  if valid is not None:
    bad &= np.asarray(valid).astype(bool)
  if bad.any():
    b, n = (int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{name}[{b}, {n}] = {boxes[b, n].tolist()} has x2 < x1 or y2 < y1; "
                     "boxes are (x1, y1, x2, y2)")


def _axis_weights(
    start: jax.Array, length: jax.Array, bins: int, sampling_ratio: int, size: int
) -> jax.Array:
  """Each bin's bilinear weight on every feature row (or column), averaged over its samples.

  Args:
    start: [batch, num_boxes] first coordinate of the box in feature pixels.
    length: [batch, num_boxes] box extent in feature pixels.
    bins: number of output bins along this axis.
    sampling_ratio: samples per bin along this axis.
    size: feature map extent along this axis.

  Returns:
    [batch, num_boxes, bins, size] in `start`'s dtype: bin i's value along this axis is
    `sum_j weights[..., i, j] * feature[j]`. A sample outside [-1, size] weighs 0.
  """
  bin_size = length / bins
  sub = (jnp.arange(bins * sampling_ratio) + 0.5) / sampling_ratio  # bin index + sub-sample offset
  coord = start[..., None] + sub * bin_size[..., None]  # [batch, num_boxes, samples]
  inside = (coord >= -1.0) & (coord <= size)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord).astype(jnp.int32)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  frac = jnp.where(at_edge, 0.0, coord - low)
  pixels = jnp.arange(size)
  taps = (jnp.where(inside, 1.0 - frac, 0.0)[..., None] * (low[..., None] == pixels)
          + jnp.where(inside, frac, 0.0)[..., None] * (high[..., None] == pixels))
  taps = taps.reshape(*coord.shape[:-1], bins, sampling_ratio, size)
  return taps.mean(axis=-2)


def _check_args(features: jax.Array, boxes: jax.Array, sampling_ratio: int) -> None:
  """Raises a ValueError naming the argument whose shape or value RoIAlign cannot take."""
  if sampling_ratio <= 0:
    raise ValueError(
        f"sampling_ratio must be > 0, got {sampling_ratio} (adaptive sampling is not jit-able)")
  if features.ndim != 4:
    raise ValueError(f"features must be [batch, height, width, channels], got {features.shape}")
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
    raise ValueError(
        f"boxes must be [batch={features.shape[0]}, num_boxes, 4], got {boxes.shape}")
  check_boxes(boxes)


def _bin_weights(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[jax.Array, jax.Array]:
  """The rows' and the columns' bin weights of every box (`_axis_weights`):
  `[batch, num_boxes, out_h, height]` and `[batch, num_boxes, out_w, width]`."""
  _check_args(features, boxes, sampling_ratio)
  out_h, out_w = _output_hw(output_size)
  height, width = features.shape[1:3]
  offset = 0.5 if aligned else 0.0
  scaled = boxes.astype(jnp.promote_types(features.dtype, jnp.float32)) * spatial_scale - offset
  x1, y1, x2, y2 = (scaled[..., i] for i in range(4))
  box_w, box_h = x2 - x1, y2 - y1
  if not aligned:
    box_w, box_h = jnp.maximum(box_w, 1.0), jnp.maximum(box_h, 1.0)
  return (_axis_weights(y1, box_h, out_h, sampling_ratio, height),
          _axis_weights(x1, box_w, out_w, sampling_ratio, width))


def _pool(spec: str, rows: jax.Array, cols: jax.Array, features: jax.Array) -> jax.Array:
  """`einsum(spec, rows, cols, features)` in the features' dtype, accumulated in at least float32
  and at full precision (a float32 product on a TPU is otherwise a single bfloat16 pass)."""
  dtype = features.dtype
  out = jnp.einsum(spec, rows.astype(dtype), cols.astype(dtype), features,
                   precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.promote_types(dtype, jnp.float32))
  return out.astype(dtype)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    *,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
) -> jax.Array:
  """Pools a fixed-size feature grid for every box.

  Bilinear sampling is separable: every bin is a weighted sum of feature rows times a weighted
  sum of columns, so the pooling is two matrix products with the bins' weights (no gathers).

  Args:
    features: [batch, height, width, channels] feature map.
    boxes: [batch, num_boxes, 4] boxes (x1, y1, x2, y2) in input-image pixels.
    output_size: bins per box, an int or (out_h, out_w).
    spatial_scale: feature pixels per input-image pixel (1 / stride).
    sampling_ratio: bilinear samples per bin along each axis; must be > 0.
    aligned: shift box coordinates by -0.5 feature pixel (detectron2's ROIAlignV2). If False,
      boxes are forced to be at least 1 feature pixel wide and high (the original Mask R-CNN).

  Returns:
    [batch, num_boxes, out_h, out_w, channels] pooled features, in the features' dtype.
  """
  rows, cols = _bin_weights(features, boxes, output_size, spatial_scale, sampling_ratio, aligned)
  return _pool("bnpy,bnqx,byxc->bnpqc", rows, cols, features)


def roi_align_mean(
    features: jax.Array,
    boxes: jax.Array,
    *,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
) -> jax.Array:
  """`roi_align(...).mean(axis=(2, 3))`, without forming the bins: one weight per feature pixel
  and box (the bins' row weights averaged times their column weights averaged).

  Args and the box convention: `roi_align`'s.

  Returns:
    [batch, num_boxes, channels] the mean of each box's bins, in the features' dtype.
  """
  rows, cols = _bin_weights(features, boxes, output_size, spatial_scale, sampling_ratio, aligned)
  return _pool("bny,bnx,byxc->bnc", rows.mean(axis=2), cols.mean(axis=2), features)
