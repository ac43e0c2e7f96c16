"""The tiny model, one layer deep, on a small ShapesParts dataset: the training tests' config.

`--config=tests/train/shapes_config.py:ROOT` where ROOT holds `tfds/` (ShapesParts built with
`ref_coco_m`) and `tokenizer/` (see `tests/conftest.py`). Everything trains; steps are few.

What these tests check (processes agree, a resume repeats a run, a trained checkpoint serves) does
not depend on depth: one layer per stack (one CLIP layer run, the penultimate of two) compiles in
about three quarters of the tiny model's time, and every run here compiles its steps afresh.
"""

import os

import ml_collections

from unires_jax import config_lib


def get_config(arg=None):
  config = config_lib.load_config("configs/tiny.py")
  config.model.max_objects = 6  # ShapesParts: up to 4 objects + 2 distractor proposals
  config.model.max_parts = 16
  config.model.vision.num_layers = 2
  config.model.llm.num_layers = 1
  config.model.convnext.depths = (1, 1, 1, 1)
  config.model.mask_decoder.num_layers = 1
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.optimizer.update(learning_rate=1e-3, warmup_steps=2)
  config.optimizer.lr_multipliers = ml_collections.ConfigDict()
  config.train.update(num_steps=6, log_every=1, checkpoint_every=2, keep_checkpoints=5,
                      image_summary_every=0)
  config.input.update(global_batch_size=8, num_threads=2, prefetch_images=4, shuffle_window=16)
  config.evals.shapes_parts_val.batch_size = 8
  if arg:
    config.input.data_dir = os.path.join(arg, "tfds")
    config.input.tokenizer = os.path.join(arg, "tokenizer")
  return config
