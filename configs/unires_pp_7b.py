"""UniRES++ at full size: CLIP ViT-L/14-336, CLIP ConvNeXt-L at 768 px, Vicuna-7B v1.5.

Backbone shapes equal the released checkpoints (openai/clip-vit-large-patch14-336, timm
`convnext_large` / open_clip `convnext_large_d_320` trunk, lmsys/vicuna-7b-v1.5).

Usage: --config=configs/unires_pp_7b.py
"""

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.model_name = "unires_pp"
  m = config.model = ml_collections.ConfigDict()
  m.dtype = "float32"        # compute dtype
  m.param_dtype = "float32"  # master weights

  m.vision = dict(  # E_l: CLIP ViT-L/14 at 336 px.
      image_size=336,
      patch_size=14,
      num_channels=3,
      hidden_size=1024,
      intermediate_size=4096,
      num_layers=24,
      num_heads=16,
      layer_norm_eps=1e-5,
      hidden_act="quick_gelu",
      select_layer=-2,           # hidden state fed to the LLM (LLaVA: penultimate)
      select_feature="patch",    # "patch" drops CLS, "cls_patch" keeps it
      interpolate_pos_encoding=False,
  )
  m.convnext = dict(  # E_h: CLIP ConvNeXt-L at 768 px (timm layout).
      image_size=768,
      in_chans=3,
      depths=(3, 3, 27, 3),
      dims=(192, 384, 768, 1536),
      layer_scale_init=1e-6,
      drop_path_rate=0.0,
      norm_eps=1e-6,
  )
  m.llm = dict(  # Vicuna-7B v1.5 (LLaMA-2 architecture).
      vocab_size=32000,          # base vocabulary; the special tokens below are added rows
      hidden_size=4096,
      intermediate_size=11008,
      num_layers=32,
      num_heads=32,
      num_kv_heads=32,
      head_dim=128,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      max_position_embeddings=4096,
      tie_word_embeddings=False,
  )
  m.roi = dict(  # Multi-Granularity Vision Flow: RoIAlign over E_h stages.
      levels=(0, 1, 2, 3),       # ConvNeXt stages pooled (C2..C5), concatenated
      output_size=7,
      sampling_ratio=2,
      aligned=True,
  )
  m.projector = dict(hidden_act="gelu", num_layers=2)
  m.mask_decoder = dict(
      hidden_dim=256,
      mask_dim=256,
      num_layers=9,              # cycles over the FPN scales, coarse to fine
      num_heads=8,
      ffn_dim=2048,
      feature_levels=(3, 2, 1),  # FPN levels used by cross-attention (stride 32, 16, 8)
      cross_attention_impl="xla",
      use_region_queries=True,   # LLM-contextualised object/part tokens join the [SEG] query
      aux_loss=True,
      norm_groups=32,
  )
  m.no_target_hidden = 256
  m.special_tokens = dict(
      image_start="<img>", image_end="</img>", image_patch="<img_patch>",
      object_start="<obj>", object_end="</obj>", object_patch="<obj_patch>",
      part_start="<part>", part_end="</part>", part_patch="<part_patch>",
      seg="[SEG]",
  )
  m.max_objects = 16
  m.max_parts = 16
  m.loss = dict(lm=1.0, mask_bce=2.0, mask_dice=0.5, no_target=1.0)

  # The input pipeline (unires_jax/data/pipeline.py). Datasets are TFDS names (with their builder
  # config) in `data_dir`, built from tfds_builders/; `train` maps a label to a dataset and its
  # sampling weight (per expression).
  config.input = ml_collections.ConfigDict()
  config.input.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default
  config.input.train = ml_collections.ConfigDict(dict(
      mres32m=dict(name="mres32m", split="train", weight=4.0),
      refcoco=dict(name="ref_coco/refcoco_unc", split="train", weight=1.0),
      refcocop=dict(name="ref_coco/refcoco+_unc", split="train", weight=1.0),
      refcocog=dict(name="ref_coco/refcocog_umd", split="train", weight=1.0),
      grefcoco=dict(name="grefcoco", split="train", weight=1.0),
  ))
  config.input.tokenizer = "lmsys/vicuna-7b-v1.5"  # a local directory: nothing is downloaded
  config.input.template = "Please segment {expression} in this image."
  config.input.answer = "Sure, it is"  # + [SEG]; the same for every sample (no label leak)
  config.input.max_prompt_tokens = 48
  # Training on a dataset without stored proposals: the targets' boxes, jittered by this fraction.
  # None: no proposals there. Evaluation always uses the stored proposals only.
  config.input.target_box_jitter = 0.1
  config.input.global_batch_size = 128
  config.input.shuffle_window = 256  # expressions
  config.input.num_threads = 8  # decoding threads per process
  config.input.prefetch_images = 64
  config.input.seed = 0
  return config
