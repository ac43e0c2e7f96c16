"""Pictures of predictions: a mask drawn over its image, prediction beside ground truth,
proposal boxes."""

import numpy as np
from PIL import Image, ImageDraw

PRED_COLOUR = np.array([255, 60, 60], np.float32)
GT_COLOUR = np.array([60, 220, 90], np.float32)
BOX_COLOURS = {"object": (255, 210, 0), "part": (0, 200, 255)}  # RGB


def overlay(image: np.ndarray, mask: np.ndarray, colour=PRED_COLOUR, alpha: float = 0.55
            ) -> np.ndarray:
  """`image [h, w, 3]` uint8 with `mask [h, w]` bool tinted in `colour` -> `[h, w, 3]` uint8."""
  if image.shape[:2] != mask.shape:
    raise ValueError(f"mask of shape {mask.shape} does not cover image of shape {image.shape}")
  out = image.astype(np.float32)
  out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
  return np.clip(out, 0, 255).astype(np.uint8)


def side_by_side(image: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """`[h, 2w + 4, 3]`: the prediction (red) left, the ground truth (green) right."""
  gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
  return np.concatenate([overlay(image, pred), gap, overlay(image, gt, GT_COLOUR)], axis=1)


def draw_boxes(image: np.ndarray, boxes: dict[str, np.ndarray]) -> np.ndarray:
  """`image [h, w, 3]` uint8 with the outlines of `boxes` (`{"object": [n, 4], "part": [m, 4]}`,
  x1, y1, x2, y2 in its pixels) in `BOX_COLOURS` -> `[h, w, 3]` uint8."""
  picture = Image.fromarray(image)
  draw = ImageDraw.Draw(picture)
  width = max(1, round(max(image.shape[:2]) / 200))
  for kind, colour in BOX_COLOURS.items():
    for x1, y1, x2, y2 in np.asarray(boxes.get(kind, []), np.float32).reshape(-1, 4):
      draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
  return np.asarray(picture)


def denormalize(image: np.ndarray) -> np.ndarray:
  """A CLIP-normalised model input `[h, w, 3]` float back to uint8 pixels."""
  from unires_jax.data.preprocess import CLIP_MEAN, CLIP_STD

  return np.clip((image * CLIP_STD + CLIP_MEAN) * 255.0, 0, 255).round().astype(np.uint8)
