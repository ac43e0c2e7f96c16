"""Scalars and images of a run: TensorBoard event files and a JSON-lines log.

`workdir/metrics.jsonl` holds one line per logged step (`{"step": ..., "loss": ...}`), the
record the tests and scripts read; `workdir/tensorboard/` the same scalars plus image summaries.
Only process 0 writes; on other processes the writer does nothing.
"""

import json
import math
import os
import re
from typing import Mapping

import jax
import numpy as np


def _tb_name(name: str) -> str:
  """TensorBoard tags hold letters, digits and `_.-/` only: "Pr@0.5" -> "Pr_at_0.5"."""
  return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name.replace("@", "_at_"))


class MetricWriter:
  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._active:
      from tensorboardX import SummaryWriter

      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
    if not self._active:
      return
    record = {"step": int(step), **{prefix + k: float(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      if math.isfinite(float(value)):  # NaN: a metric without samples (e.g. N-acc)
        self._tb.add_scalar(_tb_name(prefix + key), float(value), int(step))

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """`name -> [height, width, 3]` uint8."""
    if not self._active:
      return
    for name, image in images.items():
      self._tb.add_image(_tb_name(name), np.asarray(image, np.uint8), int(step), dataformats="HWC")
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()
