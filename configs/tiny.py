"""UniRES++ with every component a few layers deep and 32-128 wide: runs in seconds on a CPU.

The full config (configs/unires_pp_7b.py) with the sizes cut down, so both always have the
same fields and structure. Usage: --config=configs/tiny.py
"""

from unires_jax.config_lib import load_config


def get_config(arg=None):
  del arg
  config = load_config("configs/unires_pp_7b.py")
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
  return config
