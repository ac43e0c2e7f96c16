"""The ShapesParts demo (unires-demo, the README's first command): the tiny UniRES++ trained from
scratch on the CPU.

4000 training images (about 16.8k expressions), 800 steps of 32 samples, everything trainable;
the held-out split is 300 images (1253 expressions). ConvNeXt's layer scale starts at 1 rather
than timm's 1e-6: trained from scratch in minutes, a residual branch scaled by 1e-6 hardly moves.

Measured (a throwaway script with the same model, data, optimizer and loss; 2-core CPU shared
with other jobs): held-out mIoU 0.394 against 0.199 for the largest-proposal baseline (1.99x) and
0.043 for the whole image; N-acc 0.37, T-acc 0.98. The issue's bar (2x the best baseline and
N-acc > 0.8) is not reached yet: the no-target head is the open problem (see the README).

Usage: unires-demo --workdir=DIR  (or unires-train --config=configs/demo.py --workdir=DIR)
"""

import ml_collections

from unires_jax.config_lib import load_config


def get_config(arg=None):
  del arg
  config = load_config("configs/tiny.py")
  m = config.model
  m.max_objects = 6  # ShapesParts: up to 4 objects + 2 distractor proposals
  m.max_parts = 16  # up to 4 x 3 parts + 2 distractors
  m.convnext.layer_scale_init = 1.0
  m.loss.no_target = 2.0

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.optimizer.update(learning_rate=2e-3, warmup_steps=80, end_lr_fraction=0.0, b1=0.9,
                          b2=0.95, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0)
  config.optimizer.lr_multipliers = ml_collections.ConfigDict()  # everything trains

  config.train.update(num_steps=800, log_every=50, checkpoint_every=200, keep_checkpoints=2,
                      image_summary_every=200, eval_every=0)
  config.input.update(global_batch_size=32, shuffle_window=256, num_threads=2,
                      prefetch_images=16)
  config.input.train = ml_collections.ConfigDict(
      {"shapes_parts": dict(name="ref_coco_m", split="train", weight=1.0)})
  config.eval.datasets = ml_collections.ConfigDict(
      {"shapes_parts_val": dict(name="ref_coco_m", split="val")})
  config.eval.batch_size = 64

  config.demo = ml_collections.ConfigDict(dict(num_train=4000, num_val=300, seed=0,
                                               num_overlays=16))
  return config
