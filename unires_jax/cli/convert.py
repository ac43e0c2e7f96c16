"""unires-convert: checkpoints between Orbax and PyTorch (from-pytorch, to-pytorch), and
quantized for inference (quantize).

  unires-convert from-pytorch --config=configs/unires_pp_7b.py --vision=CLIP_DIR \\
      --convnext=CONVNEXT_FILE --llm=LLAMA_DIR --out=CKPT [--heads=unires_heads.safetensors]
      [--llm_adapter=ADAPTER_DIR]
    An Orbax checkpoint of the whole UniRES++ (CKPT/params, CKPT/config.json and the LLaMA
    directory's tokenizer in CKPT/tokenizer): the backbones carry the given weights, the new parts
    are freshly initialised (from config.train.seed) or read from --heads. Start training from it
    with --config.train.init_from=CKPT. With LoRA on (--config.model.llm.lora.rank=R) the
    adapters start fresh or are read from --llm_adapter (a PEFT adapter directory).

  unires-convert to-pytorch --checkpoint=CKPT_OR_WORKDIR [--step=N] --out=DIR [--dtype=bfloat16]
      [--lora_adapter [--base_model=NAME]]
    DIR/vision_tower, DIR/high_res_encoder, DIR/llm (with the tokenizer),
    DIR/unires_heads.safetensors and DIR/config.json (see unires_jax.convert.unires), streamed
    tensor by tensor from a converted checkpoint or a training run's checkpoint, sharded or not.
    A LoRA model's DIR/llm is merged; --lora_adapter also writes DIR/llm_adapter, the adapter in
    PEFT's layout.

  unires-convert quantize --checkpoint=CKPT_OR_WORKDIR [--step=N] --quantize=int8|int4 --out=DIR
    A converted checkpoint whose linear layers (the model.quantize.parts of CKPT's config: the
    LLM and the CLIP ViT unless its run set others) hold int8 / int4 weights
    (unires_jax.models.quantize) and every other parameter the compute dtype: unires-segment,
    -eval and -serve --checkpoint=DIR load it as stored, without quantizing again (the 7B model:
    7.3 GB in int8 instead of 14.7 GB in bfloat16). The tokenizer and the no-target calibration
    come along.

All three refuse an existing --out and leave nothing behind when they fail.
"""

import os
import resource

from absl import flags

from unires_jax.cli import common

COMMANDS = ("from-pytorch", "to-pytorch", "quantize")

_VISION = flags.DEFINE_string("vision", None, "from-pytorch: transformers CLIP directory.")
_CONVNEXT = flags.DEFINE_string(
    "convnext", None, "from-pytorch: timm / open_clip ConvNeXt state dict (.safetensors, .bin, "
    ".pt, .pth) or an export's high_res_encoder directory.")
_LLM = flags.DEFINE_string("llm", None, "from-pytorch: transformers LLaMA directory.")
_HEADS = flags.DEFINE_string("heads", None,
                             "from-pytorch: unires_heads.safetensors of an export (default: "
                             "freshly initialised new parts).")
_LLM_ADAPTER = flags.DEFINE_string(
    "llm_adapter", None, "from-pytorch: a PEFT LoRA adapter directory for the LLM (needs "
    "--config.model.llm.lora to match it).")
_LORA_ADAPTER = flags.DEFINE_bool(
    "lora_adapter", False, "to-pytorch: also write DIR/llm_adapter, the LLM's LoRA adapter in "
    "PEFT's layout (a model trained with config.model.llm.lora.rank > 0).")
_BASE_MODEL = flags.DEFINE_string(
    "base_model", None, "to-pytorch --lora_adapter: the adapter's base_model_name_or_path.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "to-pytorch: dtype of the written tensors.")
_GROUP_MB = flags.DEFINE_integer("group_mb", 1024,
                                 "to-pytorch: read at most this many MiB of parameters at once.")

_NEEDS = {"from-pytorch": (common.CONFIG, _VISION, _CONVNEXT, _LLM, common.OUT),
          "to-pytorch": (common.CHECKPOINT, common.OUT),
          "quantize": (common.CHECKPOINT, common.QUANTIZE, common.OUT)}


def _max_rss_mib() -> float:
  """Peak resident memory of this process. Linux's VmHWM, as `ru_maxrss` keeps the peak of the
  process image before `exec` (e.g. the parent's, when started by `subprocess`)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# jax is imported after `common.start`, as in the other programs.
def from_pytorch() -> None:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from unires_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from unires_jax.convert import unires  # pylint: disable=g-import-not-at-top

  config = common.CONFIG.value
  model = unires.import_released(config, vision_dir=_VISION.value,
                                 convnext_file=_CONVNEXT.value, llm_dir=_LLM.value,
                                 heads_file=_HEADS.value, llm_adapter=_LLM_ADAPTER.value,
                                 seed=config.train.seed)
  tokenizer = _LLM.value if any(os.path.isfile(os.path.join(_LLM.value, name)) for name in (
      "tokenizer.json", "tokenizer_config.json")) else None
  checkpoint.save_converted(nnx.state(model, nnx.Param), config, common.OUT.value, tokenizer)
  print(f"wrote {common.OUT.value} ({'with' if tokenizer else 'without'} a tokenizer); "
        f"train from it with --config.train.init_from={common.OUT.value}")


def to_pytorch() -> None:
  from unires_jax.convert import unires  # pylint: disable=g-import-not-at-top

  before = _max_rss_mib()
  unires.export_checkpoint(common.CHECKPOINT.value, common.OUT.value, step=common.STEP.value,
                           dtype=_DTYPE.value, group_bytes=_GROUP_MB.value << 20,
                           lora_adapter=_LORA_ADAPTER.value, base_model=_BASE_MODEL.value,
                           progress=print)
  print(f"wrote {common.OUT.value}; peak host memory (max RSS) {_max_rss_mib():.0f} MiB, "
        f"{before:.0f} MiB before the conversion began")


def quantize() -> None:
  from unires_jax import checkpoint, inference  # pylint: disable=g-import-not-at-top

  if common.QUANTIZE.value == "none":
    raise app.UsageError("quantize: --quantize=int8 or int4")
  where = checkpoint.locate(common.CHECKPOINT.value, common.STEP.value)
  config = inference.inference_config(where.config(), common.QUANTIZE.value)
  model, params, _ = inference.restore(common.CHECKPOINT.value, config, inference.local_mesh(),
                                       common.STEP.value)
  tokenizer = config.input.tokenizer if config.input.tokenizer and os.path.isdir(
      config.input.tokenizer) else None
  calibration = where.calibration_path if os.path.exists(where.calibration_path) else None
  checkpoint.save_converted(params, model.config, common.OUT.value, tokenizer, calibration)
  print(f"wrote {common.OUT.value}: {model.config.model.quantize.weights} weights in "
        f"{model.config.model.quantize.parts}; segment with --checkpoint={common.OUT.value}")


def main(argv) -> int:
  command = common.start_command(argv, COMMANDS)
  common.require(*_NEEDS[command], who=command)
  if os.path.exists(common.OUT.value):  # before reading gigabytes of weights
    raise FileExistsError(f"--out={common.OUT.value} already exists; choose a new output "
                          "directory")
  {"from-pytorch": from_pytorch, "to-pytorch": to_pytorch, "quantize": quantize}[command]()
  return 0


FLAG_GROUPS = (
    ("from-pytorch", (common.CONFIG, _VISION, _CONVNEXT, _LLM, _HEADS, _LLM_ADAPTER)),
    ("to-pytorch", (common.CHECKPOINT, common.STEP, _DTYPE, _GROUP_MB, _LORA_ADAPTER,
                    _BASE_MODEL)),
    ("quantize (and --checkpoint, --step)", (common.QUANTIZE,)),
    ("all", (common.OUT,)),
)


def run():
  common.run(main, "unires-convert", __doc__, FLAG_GROUPS)


if __name__ == "__main__":
  run()
