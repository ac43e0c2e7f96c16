"""Trivial baselines that a referring segmentation model must beat.

Each returns a boolean `[height, width]` mask at the image's original resolution and ignores the
expression. None of them predicts "no target": evaluate them with `pred_no_target=False`.
"""

import numpy as np


def whole_image(height: int, width: int) -> np.ndarray:
  """Every pixel: boolean `[height, width]`, all True."""
  return np.ones((height, width), np.bool_)


def _check_boxes(name: str, boxes) -> np.ndarray:
  """`boxes` as float64 `[n, 4]` (an empty input gives `[0, 4]`), or a ValueError naming it."""
  boxes = np.asarray(boxes, np.float64)
  if boxes.size == 0:
    return boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{name} must have shape [n, 4] (x1, y1, x2, y2), got {boxes.shape}")
  return boxes


def largest_proposal(object_boxes, part_boxes, height: int, width: int) -> np.ndarray:
  """The filled proposal box of largest area among the object and part proposals.

  Args:
    object_boxes: `[n_obj, 4]` x1, y1, x2, y2 in original image pixels; may be empty.
    part_boxes: `[n_part, 4]` likewise; may be empty.
    height, width: the image's original size.

  Returns:
    Boolean `[height, width]`: pixel (x, y) is True when its centre (x + 0.5, y + 0.5) lies in
    the closed box x1 <= x + 0.5 <= x2, y1 <= y + 0.5 <= y2. The area is
    max(x2 - x1, 0) * max(y2 - y1, 0) (before clipping to the image); on a tie the first box
    wins, object boxes before part boxes. All False when there is no proposal.
  """
  boxes = np.concatenate(
      [_check_boxes("object_boxes", object_boxes), _check_boxes("part_boxes", part_boxes)])
  if len(boxes) == 0:
    return np.zeros((height, width), np.bool_)
  areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
  x1, y1, x2, y2 = boxes[np.argmax(areas)]
  ys = np.arange(height)[:, None] + 0.5
  xs = np.arange(width)[None, :] + 0.5
  return (ys >= y1) & (ys <= y2) & (xs >= x1) & (xs <= x2)
