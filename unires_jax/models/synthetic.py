"""Learnable random batches in the model's input layout, for smoke tests and benchmarks.

Each image holds one bright rectangle on a noisy background; the expression's target is that
rectangle, its box is the first object proposal, and its mask the target mask. A sample marked
no-target shows no rectangle and has an empty mask. Real data comes from `unires_jax.data`.
"""

import ml_collections
import numpy as np

from unires_jax.models import prompt


def synthetic_batch(
    cfg: ml_collections.ConfigDict,
    batch_size: int,
    *,
    seed: int = 0,
    no_target_every: int = 0,
    prompt_length: int = 6,
    proposals: bool = True,
) -> dict[str, np.ndarray]:
  """A batch for `UniRESPP(cfg)` (see the field list in `unires_jax.models.unires`).

  Args:
    cfg: `config.model`.
    batch_size: number of samples.
    seed: NumPy seed; the same seed gives the same batch.
    no_target_every: every n-th sample (n > 0) refers to nothing; 0 for none.
    prompt_length: tokens of the (random) expression.
    proposals: False leaves every proposal slot padding (an image in which the detector found
      nothing); True gives one object and one part proposal.
  """
  rng = np.random.default_rng(seed)
  special = prompt.SpecialTokens.appended_to(cfg.llm.vocab_size)
  s_low, s_high = cfg.vision.image_size, cfg.convnext.image_size
  n_img = prompt.num_image_tokens(cfg.vision)
  max_length = (prompt.visual_prefix_length(n_img, cfg.max_objects, cfg.max_parts)
                + prompt_length + 2)

  out = {k: [] for k in ("image_high", "object_boxes", "object_valid", "part_boxes",
                         "part_valid", "masks", "no_target", "input_ids", "attention_mask",
                         "loss_mask")}
  present = int(proposals)
  for i in range(batch_size):
    no_target = no_target_every > 0 and i % no_target_every == no_target_every - 1
    image = rng.normal(0.0, 0.3, (s_high, s_high, 3)).astype(np.float32)
    mask = np.zeros((s_high, s_high), np.float32)
    x1, y1 = rng.integers(0, s_high // 2, size=2)
    w, h = rng.integers(s_high // 4, s_high // 2, size=2)
    box = np.array([x1, y1, x1 + w, y1 + h], np.float32)
    if not no_target:
      mask[y1:y1 + h, x1:x1 + w] = 1.0
      image[y1:y1 + h, x1:x1 + w] += 1.5
    objects = np.zeros((cfg.max_objects, 4), np.float32)
    objects[0] = box
    object_valid = np.arange(cfg.max_objects) < present
    parts = np.zeros((cfg.max_parts, 4), np.float32)
    parts[0] = [box[0], box[1], box[0] + w / 2, box[1] + h / 2]
    part_valid = np.arange(cfg.max_parts) < present
    answer = [int(rng.integers(1, cfg.llm.vocab_size)), special.seg]
    seq = prompt.build_sequence(
        rng.integers(1, cfg.llm.vocab_size, prompt_length).tolist(), answer,
        special=special, num_image_tokens=n_img, num_objects=present, num_parts=present,
        max_objects=cfg.max_objects, max_parts=cfg.max_parts, max_length=max_length)
    for key, value in (("image_high", image), ("object_boxes", objects),
                       ("object_valid", object_valid), ("part_boxes", parts),
                       ("part_valid", part_valid), ("masks", mask), ("no_target", no_target)):
      out[key].append(value)
    for key, value in seq.items():
      out[key].append(value)
  batch = {k: np.stack(v) for k, v in out.items()}
  # The low-resolution view is the same image, box-filtered down (s_high is a multiple of s_low).
  f = s_high // s_low
  batch["image_low"] = batch["image_high"][:, :f * s_low, :f * s_low].reshape(
      batch_size, s_low, f, s_low, f, 3).mean(axis=(2, 4))
  return batch
