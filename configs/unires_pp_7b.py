"""UniRES++ at full size: CLIP ViT-L/14-336, CLIP ConvNeXt-L at 768 px, Vicuna-7B v1.5.

Backbone shapes equal the released checkpoints (openai/clip-vit-large-patch14-336, timm
`convnext_large` / open_clip `convnext_large_d_320` trunk, lmsys/vicuna-7b-v1.5).

Usage: --config=configs/unires_pp_7b.py[:llm_layers=N][,slice=NAME]
  llm_layers: LLaMA decoder layers (default 32, Vicuna-7B's): fewer make a cheaper model of the
    same widths (memory and compile-time studies, short smoke runs).
  slice: the Cloud TPU slice to train on, as gcloud and `launch/launch.py --tpu` name it (SLICES
    below; default DEFAULT_SLICE, v5p-128): sets that slice's global batch and `remat` (its
    per-chip memory and cost-model MFU: docs/tpu.md, "Recipes per slice") and `config.topology`,
    the slice `benchmarks/tpu_compile.py` compiles for.
"""

import ml_collections

from unires_jax import config_lib


# Per slice (gcloud's accelerator type, as `launch/launch.py --tpu` takes it: v5p counts
# TensorCores, 2 per chip; v6e counts chips): its topology, the global batch (sequences per chip
# = batch / chips) and remat; every slice's mesh is fsdp over all chips (config.mesh). Chosen by
# benchmarks/tpu_compile.py's compiles: the cost-model MFU counted layer by layer where XLA's
# program lets it be counted (v5p-128: 65.3% at 76.31 of 95.74 GiB per chip), memory elsewhere;
# docs/tpu.md, "Recipes per slice", has every row and what else was tried.
SLICES = {
    "v5p-16": dict(topology="v5p:2x2x2", batch=64, remat="none"),
    "v5p-32": dict(topology="v5p:2x2x4", batch=128, remat="none"),
    "v5p-128": dict(topology="v5p:4x4x4", batch=512, remat="none"),
    "v6e-8": dict(topology="v6e:2x4", batch=128, remat="full"),
    "v6e-16": dict(topology="v6e:4x4", batch=128, remat="full"),
    "v6e-64": dict(topology="v6e:8x8", batch=128, remat="none"),
}
DEFAULT_SLICE = "v5p-128"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, llm_layers=32, slice=DEFAULT_SLICE)
  if arg.slice not in SLICES:
    raise ValueError(f"configs/unires_pp_7b.py: unknown slice {arg.slice!r}; known: "
                     f"{', '.join(SLICES)}")
  recipe = SLICES[arg.slice]
  config = ml_collections.ConfigDict()
  config.model_name = "unires_pp"
  m = config.model = ml_collections.ConfigDict()
  # The recipe for a pod slice (README, "Compile for a TPU slice"; benchmarks/tpu_compile.py
  # checks that it fits): bfloat16 compute over float32 master weights, parameters and optimizer
  # state sharded over every chip (config.mesh: fsdp=-1), layers scanned, not rematerialised.
  m.dtype = "bfloat16"       # compute dtype
  m.param_dtype = "float32"  # master weights
  # Weight-only quantization for inference (unires_jax/models/quantize.py, qwix): "int8" or
  # "int4" stores the kernels of the `parts`' linear layers in that type (one scale per output
  # channel, or per `tile_size` input rows); unires-segment / -eval / -serve --quantize set it.
  m.quantize = dict(weights="none", parts="llm,vision", tile_size=0)

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
      # jaxlib 0.10.2 gets the kernel gradient of a grouped convolution wrong on meshes where the
      # batch is not split over every axis; True runs the depthwise convolutions per device
      # (unires_jax.models.convnext.ConvNeXt says more). Same outputs either way.
      grouped_conv_grad_bug_workaround=True,
  )
  m.llm = dict(  # Vicuna-7B v1.5 (LLaMA-2 architecture).
      vocab_size=32000,          # base vocabulary; the special tokens below are added rows
      hidden_size=4096,
      intermediate_size=11008,
      num_layers=arg.llm_layers,
      num_heads=32,
      num_kv_heads=32,
      head_dim=128,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      max_position_embeddings=4096,
      tie_word_embeddings=False,
      # Self-attention (unires_jax/kernels/llm_attention.py): "xla" (einsum, any platform),
      # "cudnn" (cuDNN fused attention, GPU only) or "splash" (Pallas splash attention, TPU
      # only); generation with a KV cache always runs "xla".
      attention="xla",
      # Low-rank adapters (unires_jax/models/lora.py): rank 0 trains the LLM as
      # config.optimizer.lr_multipliers say; rank > 0 freezes its weights and trains adapters
      # of that rank on the `targets` (any of q_proj, k_proj, v_proj, o_proj, gate_proj,
      # up_proj, down_proj) and the special-token rows. LISA: rank 8, alpha 16, dropout 0.05.
      lora=dict(rank=0, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj")),
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
  m.no_target_threshold = 0.5  # "no target" when sigmoid(no-target logit) is above it
  m.special_tokens = dict(
      image_start="<img>", image_end="</img>", image_patch="<img_patch>",
      object_start="<obj>", object_end="</obj>", object_patch="<obj_patch>",
      part_start="<part>", part_end="</part>", part_patch="<part_patch>",
      seg="[SEG]",
  )
  m.max_objects = 16
  m.max_parts = 16
  # Room for the answer after the prompt (config.input.answer plus [SEG]). Training takes the LM
  # logits at these positions only, not at the ~740 of the sequence (a 32k-wide LM head at each).
  m.max_answer_tokens = 16
  # `region`: which proposal the expression selects, or none (losses.region_selection_ce); a
  # proposal is selected when the target mask covers `region_min_coverage` of its box.
  # `no_target_prior`: the share of no-target expressions in the training mixture; the no-target
  # losses correct for it (losses.prior_adjusted_logits), 0.5 = no correction.
  m.loss = dict(lm=1.0, mask_bce=2.0, mask_dice=0.5, no_target=1.0, region=1.0,
                region_min_coverage=0.25, no_target_prior=0.5)
  # Rematerialisation of the transformer layers (CLIP ViT and LLaMA) in the backward pass:
  # "none", "full" (recompute everything) or "dots" (keep matmul outputs without batch dims).
  # "full" costs a third more LLM FLOPs and holds one layer's activations instead of all: the
  # slice's recipe (SLICES) says which its memory needs.
  m.remat = recipe["remat"]
  # Scanned layers (MaxText's `scan_layers`): the CLIP ViT and LLaMA layers, the blocks of each
  # ConvNeXt stage and the mask decoder's layers (one round of its 3 FPN levels per scan step)
  # are stacked modules (parameters `[num_layers, ...]` on a `layers` axis) applied with
  # `jax.lax.scan`, so the train step compiles one layer instead of every layer. False: unrolled
  # layers, parameter paths `.../layers/<i>/...`, `.../blocks/<i>/...`
  # (the same values either way; checkpoints differ in layout, the converters handle both).
  m.scan_layers = True

  # The device mesh (unires_jax/parallel): one size per axis, one of them may be -1 (the rest).
  # Batches are split over data x fsdp; parameters follow the rules table in
  # unires_jax/parallel/rules.py (fsdp shards the embed dimension, tensor the mlp/heads/vocab one).
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # The TPU slice this recipe is for (SLICES; `launch/launch.py --tpu` takes gcloud's name of
  # it, the `slice=` argument): benchmarks/tpu_compile.py compiles for it unless given --topology.
  config.topology = recipe["topology"]
  # Logical axis -> mesh axes (MaxText's logical_axis_rules): comma-separated mesh axes, "" for
  # replicated; change one from the command line, e.g. --config.logical_axis_rules.mlp=fsdp.
  # The model names every parameter and residual-stream dimension (unires_jax/models/layers.py
  # lists the names); this table alone knows the mesh. fsdp shards the residual width, tensor the
  # hidden / head / vocabulary dimensions (Megatron style). Convolution channels stay replicated:
  # sharded, they hit a partitioner bug (unires_jax/parallel/rules.py).
  config.logical_axis_rules = ml_collections.ConfigDict(dict(
      activation_batch="data,fsdp", activation_length="", activation_embed="",
      embed="fsdp", features="fsdp", mlp="tensor", heads="tensor", kv_heads="tensor",
      vocab="tensor", conv_in="", conv_out="", position="", conv_window="", norm="",
      layers="",  # the stacked-layer axis of scanned layers (config.model.scan_layers)
      lora_rank=""))  # the rank dimension of LoRA adapters (config.model.llm.lora)

  # AdamW with linear warmup then cosine decay to `end_lr_fraction * learning_rate`.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-5
  config.optimizer.warmup_steps = 500
  config.optimizer.end_lr_fraction = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1.0
  # Learning-rate multiplier per module: keys are parameter path prefixes ("vision",
  # "llm/model/embed_tokens"), the longest matching prefix wins, 1.0 elsewhere; 0.0 freezes (no
  # optimizer state is kept). Stage 1 freezes both vision encoders.
  config.optimizer.lr_multipliers = ml_collections.ConfigDict(dict(vision=0.0, convnext=0.0))

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 20_000
  config.train.accum_steps = 1  # micro-batches per step (the global batch is split into them)
  # XLA's effort on the train step's run time, -1..1 (jax_exec_time_optimization_effort): 0 is
  # the compiler's default, the program to train with. -1 compiles this step for v5p:4x4x4 in
  # 139 s instead of 362 s on a 2-core host, its per-chip memory within 7% of the default's,
  # but without memory-space assignment (nothing in VMEM, no prefetches); what that costs in
  # step time needs a TPU to measure (docs/tpu.md, "Compile time"). For a first fit check:
  # benchmarks/tpu_compile.py --config.train.exec_time_optimization_effort=-1.
  config.train.exec_time_optimization_effort = 0.0
  config.train.seed = 0  # parameter initialisation
  # A new run starts from these parameters instead: a converted checkpoint (`unires-convert
  # from-pytorch`, e.g. CLIP + ConvNeXt + Vicuna) or another run's work directory.
  config.train.init_from = ""
  config.train.log_every = 50
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 3
  config.train.async_checkpointing = True
  config.train.max_nonfinite_in_row = 20  # skipped steps in a row before training stops
  config.train.image_summary_every = 1000  # predicted masks over the input, in TensorBoard

  # Evaluators (unires_jax/evaluation/evals.py), run by unires-eval and during training: name ->
  # dataset (a TFDS name in config.input.data_dir) and split, global batch size, scoring
  # protocol (`classic`: RefCOCO/+/g and RefCOCOm as LAVT scores them; `rela`: gRefCOCO as ReLA
  # does), scoring resolution (0: each image's original size, as LISA-style models are scored;
  # 480 gives LAVT's and ReLA's own 480 x 480 grid), and `every` (training runs it at each
  # multiple of `every` steps, 0: never, and after the last step). Results:
  # workdir/eval/<name>_<step>.json and TensorBoard.
  config.evals = ml_collections.ConfigDict(dict(
      refcocom_val=dict(dataset="ref_coco_m", split="val", batch_size=64, protocol="classic",
                        resolution=0, every=5000),
      grefcoco_val=dict(dataset="grefcoco", split="val", batch_size=64, protocol="rela",
                        resolution=0, every=5000),
  ))

  # The no-target threshold chosen after the last training step on a calibration split
  # (unires_jax/evaluation/calibration.py: the best balanced accuracy there), stored with the
  # checkpoint and used by unires-eval, -segment and -serve unless a threshold is given. The
  # split must be one the model did not train on and not the one reported: carve it from the
  # training images with TFDS's slicing, e.g. split="train[:300]" here and the training
  # mixture's split="train[300:]" (configs/demo.py). Several datasets: comma-separated names and
  # as many splits, scored together (configs/demo_finetune.py). An empty split: no calibration.
  config.calibration = ml_collections.ConfigDict(dict(dataset="", split="", batch_size=64))

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
  # Training on a dataset with stored proposals (unires-propose): each target's box, jittered as
  # above, joins the detector's with this probability, so the no-target head sees both images
  # whose referent no proposal holds and images where one does. 0: the detector's boxes only.
  config.input.add_target_boxes = 0.5
  config.input.global_batch_size = recipe["batch"]  # the slice's (SLICES)
  config.input.shuffle_window = 256  # expressions
  config.input.num_threads = 8  # decoding threads per process
  config.input.prefetch_images = 64
  config.input.seed = 0

  # Object and part proposals from an OWLv2 detector (unires-propose, unires-segment --detector;
  # unires_jax/propose.py). Objects: the top object_k boxes by objectness above object_min_score
  # after NMS; parts: boxes scoring above part_min_score against "a photo of a <part>" for a
  # part of part_vocabulary, NMS, top part_k. The model keeps the first max_objects / max_parts.
  config.proposals = ml_collections.ConfigDict(dict(
      batch_size=8,  # images per detector step and process (a multiple of its devices)
      object_k=16, object_min_score=0.0, object_nms_iou=0.5,
      part_k=16, part_min_score=0.1, part_nms_iou=0.5,
      part_vocabulary=PART_VOCABULARY, query_template="a photo of a {part}",
      pad_value=0.5,  # OWLv2's gray padding to a square (transformers 5 pads with 0.0)
      preprocess_threads=8,  # host threads that resize images for the detector
      shard_images=256,  # images per shard file (a rerun skips finished shards)
  ))
  return config


# Part names for OWLv2's text queries: RefCOCOm's part classes (people, animals, vehicles,
# furniture, household objects) in plain words.
PART_VOCABULARY = (
    "head", "hair", "face", "eye", "ear", "nose", "mouth", "neck", "arm", "hand", "finger",
    "torso", "shoulder", "leg", "knee", "foot", "tail", "paw", "wing", "beak", "horn", "mane",
    "wheel", "tire", "window", "windshield", "door", "handle", "headlight", "mirror", "seat",
    "roof", "bumper", "license plate", "engine", "propeller", "sail", "screen", "keyboard",
    "button", "backrest", "armrest", "cushion", "drawer", "shelf", "lid",
    "spout", "blade", "strap", "collar", "sleeve", "pocket", "hat", "shoe",
)
