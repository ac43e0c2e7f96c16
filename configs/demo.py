"""The ShapesParts demo (unires-demo, the README's first command): the tiny UniRES++ trained from
scratch on the CPU.

4000 training images (about 16.8k expressions), 1600 steps of 32 samples (about 3 epochs),
everything trainable; the held-out split is 300 images (1253 expressions). ConvNeXt at 64 px (mask
logits 16x16); 128 px and 96 px, a wider or deeper LLM, ConvNeXt layer scale 1.0 and no-target
loss weights 5 and 10 were tried and did no better within the time.

Measured with `unires-demo` and this config on the 2-core CPU:
  seed 0: held-out mIoU 0.470 (object 0.444, part 0.468, multi 0.541) against 0.199 for the
          largest-proposal baseline (2.36x) and 0.043 for the whole image; N-acc 0.39, T-acc 0.98;
          906 s in all (train 862 s) with the CPU shared with two other jobs.
  seed 1 (--config.demo.seed=1 --config.train.seed=1 --config.input.seed=1): mIoU 0.520 against
          0.179 (2.90x); N-acc 0.44, T-acc 0.98; 600 s in all (data + build 31 s, train 558 s,
          eval 11 s) with the CPU to itself.
The mIoU bar (2x the best baseline) is met; the N-acc bar (> 0.8) is not. The no-target head
learns only a language prior ("all houses" / "all purple objects" are mostly absent in ShapesParts)
and ignores the image, so "the purple tree" is never called absent; the README's demo "Status"
lists six head / loss / data changes tried against it (N-acc 0.39-0.49).

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
  m.loss.no_target = 2.0
  m.loss.region = 1.0

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.optimizer.update(learning_rate=2e-3, warmup_steps=250, end_lr_fraction=0.0, b1=0.9,
                          b2=0.95, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0)
  config.optimizer.lr_multipliers = ml_collections.ConfigDict()  # everything trains

  config.train.update(num_steps=4000, log_every=100, checkpoint_every=1000, keep_checkpoints=2,
                      image_summary_every=1000, eval_every=0)
  # The longest ShapesParts prompt is 19 words; 24 slots instead of 48 shorten every sequence.
  config.input.update(global_batch_size=16, shuffle_window=256, num_threads=2,
                      prefetch_images=16, max_prompt_tokens=24)
  config.input.train = ml_collections.ConfigDict(
      {"shapes_parts": dict(name="ref_coco_m", split="train", weight=1.0)})
  config.eval.datasets = ml_collections.ConfigDict(
      {"shapes_parts_val": dict(name="ref_coco_m", split="val")})
  config.eval.batch_size = 64

  config.demo = ml_collections.ConfigDict(dict(num_train=4000, num_val=300, seed=0,
                                               num_overlays=16))
  return config
