"""UniRES++ with every component a few layers deep and 32-128 wide: runs in seconds on a CPU.

Same structure and fields as configs/unires_pp_7b.py. Usage: --config=configs/tiny.py
"""

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.model_name = "unires_pp"
  m = config.model = ml_collections.ConfigDict()
  m.dtype = "float32"
  m.param_dtype = "float32"

  m.vision = dict(
      image_size=32,
      patch_size=8,
      num_channels=3,
      hidden_size=32,
      intermediate_size=64,
      num_layers=3,
      num_heads=4,
      layer_norm_eps=1e-5,
      hidden_act="quick_gelu",
      select_layer=-2,
      select_feature="patch",
      interpolate_pos_encoding=False,
  )
  m.convnext = dict(
      image_size=64,
      in_chans=3,
      depths=(1, 1, 2, 1),
      dims=(16, 32, 48, 64),
      layer_scale_init=1e-6,
      drop_path_rate=0.0,
      norm_eps=1e-6,
  )
  m.llm = dict(
      vocab_size=128,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      max_position_embeddings=256,
      tie_word_embeddings=False,
  )
  m.roi = dict(levels=(0, 1, 2, 3), output_size=4, sampling_ratio=2, aligned=True)
  m.projector = dict(hidden_act="gelu", num_layers=2)
  m.mask_decoder = dict(
      hidden_dim=32,
      mask_dim=32,
      num_layers=3,
      num_heads=4,
      ffn_dim=64,
      feature_levels=(3, 2, 1),
      cross_attention_impl="xla",
      use_region_queries=True,
      aux_loss=True,
      norm_groups=8,
  )
  m.no_target_hidden = 32
  m.special_tokens = dict(
      image_start="<img>", image_end="</img>", image_patch="<img_patch>",
      object_start="<obj>", object_end="</obj>", object_patch="<obj_patch>",
      part_start="<part>", part_end="</part>", part_patch="<part_patch>",
      seg="[SEG]",
  )
  m.max_objects = 4
  m.max_parts = 4
  m.loss = dict(lm=1.0, mask_bce=2.0, mask_dice=0.5, no_target=1.0)
  return config
