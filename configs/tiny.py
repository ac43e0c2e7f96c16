"""UniRES++ with every component a few layers deep and 32-128 wide: runs in seconds on a CPU.

The full config (configs/unires_pp_7b.py) with the sizes cut down, so both always have the
same fields and structure. Its data is ShapesParts, the project's synthetic scenes in the
RefCOCOm layout (`python -m unires_jax.data.shapes_parts --out=RAW`, then
`tfds build tfds_builders/ref_coco_m --manual_dir=RAW --data_dir=DATA`), with a word-level
tokenizer (`unires_jax.data.tokenizer.train_tokenizer`):

  unires-train --config=configs/tiny.py --workdir=RUN --config.input.data_dir=DATA \\
      --config.input.tokenizer=TOKENIZER_DIR
"""

import ml_collections

from unires_jax import config_lib


def get_config(arg=None):
  config_lib.parse_arg(arg)  # no variants
  config = config_lib.sibling(__file__, "unires_pp_7b.py")
  m = config.model
  m.vision.update(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_layers=3, num_heads=4)
  m.convnext.update(image_size=64, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))
  m.llm.update(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
  m.roi.output_size = 4
  m.mask_decoder.update(hidden_dim=32, mask_dim=32, num_layers=3, num_heads=4, ffn_dim=64,
                        norm_groups=8)
  m.no_target_hidden = 32
  m.max_objects = 4
  m.max_parts = 4
  # The CPU's choices, not the TPU recipe of the full config: float32, layers unrolled and kept,
  # the batch split over every device.
  m.update(dtype="float32", remat="none", scan_layers=False)
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.topology = "v5p:2x2x1"  # benchmarks/tpu_compile.py's default: the smallest v5p slice

  config.input.train = ml_collections.ConfigDict(
      {"shapes_parts": dict(name="ref_coco_m", split="train", weight=1.0)})
  # ShapesParts holds no-target expressions, which `classic` would not judge: `lisa`.
  config.evals = ml_collections.ConfigDict({"shapes_parts_val": dict(
      dataset="ref_coco_m", split="val", batch_size=64, protocol="lisa", resolution=0,
      every=0)})
  config.input.tokenizer = ml_collections.config_dict.placeholder(str)  # a trained word-level one
  # ShapesParts's stored proposals already hold the targets' boxes (moved) and distractors.
  config.input.add_target_boxes = 0.0
  return config
