"""The TFDS decoder of the pipeline's sources (`pipeline.open_source`); imports
`tensorflow_datasets`, so the pipeline imports it only when it opens a source."""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


class MaskDecoder(tfds.decode.Decoder):
  """The target masks' PNGs -> `[H, W, 1]` uint8 (read-only), as TFDS's own NumPy decoding gives
  them but without its byte-by-byte copy to add the channel axis (`np.repeat`), which costs half
  as much again as decoding the PNG."""

  def decode_example(self, serialized):  # TensorFlow's decoding: TFDS's own.
    return self.feature.decode_example(serialized)

  def decode_example_np(self, png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
      mask = np.asarray(image, np.uint8)
    return mask[..., None] if mask.ndim == 2 else mask

  def decode_batch_example_np(self, pngs) -> list[np.ndarray]:
    return [self.decode_example_np(png) for png in pngs]
