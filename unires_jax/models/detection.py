"""What goes into and comes out of the OWLv2 detector (`models.owlv2`), in NumPy: the image
preprocessing, transformers' `post_process_object_detection`, class-agnostic NMS and the
objectness proposals (the top-k boxes by objectness after NMS).

Geometry: OWLv2 pads an image bottom/right to a square of side max(height, width) and resizes
that square to the model's image_size, so a predicted box (cx, cy, w, h in [0, 1]) is relative to
the padded square; times max(height, width) it is in the original image's pixels (the padding
only adds area right of and below the image).
"""

import math
from typing import Any, Sequence

import numpy as np

# OWLv2 normalises with CLIP's mean and std.
OWLV2_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
OWLV2_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# The original OWLv2 (scenic) pads with mid-gray; transformers 5 pads with 0.0 (black).
OWLV2_PAD_VALUE = 0.5


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of [h, w, c] over h and w, with torchvision's kernel (size
  2 * ceil(3 sigma) + 1) and its 'reflect' border (no edge repeat)."""
  size = 2 * math.ceil(3 * sigma) + 1
  offsets = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2)
  kernel = np.exp(-0.5 * (offsets / np.float32(sigma)) ** 2)
  kernel /= kernel.sum()
  half = size // 2
  for axis in (0, 1):
    pad = [(0, 0)] * 3
    pad[axis] = (half, half)
    padded = np.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    x = sum(kernel[k] * np.take(padded, np.arange(k, k + n), axis=axis) for k in range(size))
  return x.astype(np.float32)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Taps (i0, i1) and weight of i1 for torch's bilinear resize (align_corners=False, no
  antialias): source coordinate (i + 0.5) * in / out - 0.5, clamped at 0.

  torch's CPU kernel computes it as a fused multiply-add on the float32 scale (one rounding);
  float64 arithmetic rounded once to float32 gives the same bits, where plain float32 arithmetic
  would move taps near coordinate 1000 by up to 6e-5.
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  src = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0).astype(np.float32)


def _bilinear_resize(x: np.ndarray, size: int) -> np.ndarray:
  """[h, w, c] -> [size, size, c]."""
  for axis in (0, 1):
    i0, i1, t = _bilinear_taps(x.shape[axis], size)
    shape = [1, 1, 1]
    shape[axis] = size
    t = t.reshape(shape)
    x = np.take(x, i0, axis=axis) * (1 - t) + np.take(x, i1, axis=axis) * t
  return x


def owlv2_preprocess(image: np.ndarray, image_size: int,
                     pad_value: float = OWLV2_PAD_VALUE) -> np.ndarray:
  """An RGB uint8 image -> the detector's input, as transformers' `Owlv2ImageProcessor`.

  Scales to [0, 1], pads bottom/right to a square with `pad_value`, blurs when downscaling
  (sigma = (side / image_size - 1) / 2, as skimage's anti-aliasing), resizes bilinearly to
  `image_size` and normalises with `OWLV2_MEAN` / `OWLV2_STD`.

  Args:
    image: [height, width, 3] uint8.
    image_size: the model's `config.vision.image_size`.
    pad_value: the padding in [0, 1] units; `OWLV2_PAD_VALUE` (gray, as the original OWLv2 and
      transformers 4) or 0.0 (as transformers 5).

  Returns:
    [image_size, image_size, 3] float32.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an RGB uint8 image [height, width, 3], got {image.dtype}"
                     f"{list(image.shape)}")
  height, width = image.shape[:2]
  side = max(height, width)
  x = np.full((side, side, 3), pad_value, np.float32)
  x[:height, :width] = image.astype(np.float32) * np.float32(1 / 255)
  sigma = (np.float32(side) / np.float32(image_size) - 1) / 2
  if sigma > 0:
    x = _gaussian_blur(x, float(sigma))
  x = _bilinear_resize(x, image_size)
  return ((x - OWLV2_MEAN) / OWLV2_STD).astype(np.float32)


def center_to_corners(boxes: np.ndarray) -> np.ndarray:
  """[..., 4] (cx, cy, w, h) -> (x0, y0, x1, y1)."""
  cx, cy, w, h = np.moveaxis(boxes, -1, 0)
  return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return (1 / (1 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def _pixel_scale(target_size: Sequence[int] | None) -> np.float32:
  """Factor from boxes relative to the padded square to the original image's pixels."""
  return np.float32(1.0 if target_size is None else max(target_size))


def postprocess(logits: np.ndarray, pred_boxes: np.ndarray, threshold: float = 0.1,
                target_sizes: Sequence[Sequence[int]] | np.ndarray | None = None
                ) -> list[dict[str, np.ndarray]]:
  """transformers' `Owlv2ImageProcessor.post_process_object_detection`.

  Args:
    logits: [batch, patches, queries] (the detector's `logits`).
    pred_boxes: [batch, patches, 4] (cx, cy, w, h) relative to the padded square.
    threshold: keep patches whose score is above it.
    target_sizes: [batch] (height, width) of the original images, or None for boxes in [0, 1]
      of the padded square.

  Returns:
    Per image, {"scores": [n] sigmoid of the best query's logit, "labels": [n] that query's
    index, "boxes": [n, 4] (x0, y0, x1, y1), in pixels of the original image when target_sizes
    is given (relative box times max(height, width), the padded square's side)}, patch order.
  """
  logits, pred_boxes = np.asarray(logits), np.asarray(pred_boxes, np.float32)
  if target_sizes is not None and len(target_sizes) != len(logits):
    raise ValueError(f"{len(target_sizes)} target sizes for {len(logits)} images")
  results = []
  for i in range(len(logits)):
    scores = _sigmoid(logits[i].max(-1))
    labels = logits[i].argmax(-1)
    boxes = center_to_corners(pred_boxes[i])
    boxes = boxes * _pixel_scale(None if target_sizes is None else target_sizes[i])
    keep = scores > threshold
    results.append({"scores": scores[keep], "labels": labels[keep], "boxes": boxes[keep]})
  return results


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one (x0, y0, x1, y1) box [4] with each of `boxes` [n, 4] -> [n] (0 where the union
  is empty)."""
  lt = np.maximum(box[:2], boxes[:, :2])
  rb = np.minimum(box[2:], boxes[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  union = area(box) + area(boxes) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        max_keep: int | None = None) -> np.ndarray:
  """Class-agnostic greedy non-maximum suppression, as `torchvision.ops.nms`.

  Boxes are visited by descending score (ties in index order); a box is dropped when its IoU
  with an already kept box is above `iou_threshold`.

  Args:
    boxes: [n, 4] (x0, y0, x1, y1).
    scores: [n].
    iou_threshold: IoU above which the lower-scored box is suppressed.
    max_keep: stop after this many kept boxes (None: all).

  Returns:
    [k] int64 indices of the kept boxes, by descending score.
  """
  boxes = np.asarray(boxes, np.float32)
  order = np.argsort(-np.asarray(scores), kind="stable")
  keep = []
  while order.size and (max_keep is None or len(keep) < max_keep):
    best, order = order[0], order[1:]
    keep.append(best)
    order = order[box_iou(boxes[best], boxes[order]) <= iou_threshold]
  return np.asarray(keep, np.int64)


def objectness_proposals(objectness_logits: np.ndarray, pred_boxes: np.ndarray, *, k: int,
                         iou_threshold: float, min_score: float = 0.0,
                         target_size: Sequence[int] | None = None) -> dict[str, Any]:
  """One image's object proposals: the top-k boxes by objectness after class-agnostic NMS.

  Args:
    objectness_logits: [patches] (the detector's `objectness_logits` of one image).
    pred_boxes: [patches, 4] (cx, cy, w, h) relative to the padded square.
    k: at most this many proposals.
    iou_threshold: the NMS threshold.
    min_score: drop boxes whose objectness (sigmoid) is not above it, before NMS (and boxes
      that lie wholly in the padding, empty once clipped).
    target_size: (height, width) of the original image: boxes in its pixels, clipped to it;
      None: relative to the padded square, clipped to [0, 1].

  Returns:
    {"scores": [n] objectness (sigmoid), descending, "boxes": [n, 4] (x0, y0, x1, y1)}, n <= k.
  """
  scores = _sigmoid(np.asarray(objectness_logits))
  boxes = center_to_corners(np.asarray(pred_boxes, np.float32)) * _pixel_scale(target_size)
  limit = np.array([1.0, 1.0] if target_size is None else target_size[::-1], np.float32)
  boxes = np.clip(boxes, 0, np.concatenate([limit, limit]))
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  candidates = np.flatnonzero((scores > min_score) & (area > 0))  # not all in the padding
  kept = candidates[nms(boxes[candidates], scores[candidates], iou_threshold, max_keep=k)]
  return {"scores": scores[kept], "boxes": boxes[kept]}
