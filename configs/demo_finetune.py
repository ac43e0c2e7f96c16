"""Fine-tuning a trained demo model on a concept it never saw, mixed with what it knew
(docs/finetune.md, the worked example).

Usage: --config=configs/demo_finetune.py:base=DIR[,lora_rank=R][,steps=N]
  base: the base run's work directory (`unires-demo --workdir=DIR`): its config (DIR/config.json,
    so the model is the one it trained, whatever flags it ran with) is the starting point here,
    its last checkpoint the parameters (`train.init_from`), its tokenizer is kept and its
    `DIR/tfds` is the data directory, where the new dataset must be built too
    (`tfds build tfds_builders/ref_custom --manual_dir=NEW --data_dir=DIR/tfds`).
  lora_rank: 0 (default) fine-tunes everything; R > 0 freezes the LLM and trains rank-R adapters
    on all its projections instead (the vision side, projectors, mask decoder and no-target head
    still train, as in LISA).
  steps: training steps (default 600).

The mixture (`config.input.train`): the new dataset (`ref_custom`, split `train`) and the base's
own training data (`ref_coco_m`, the demo's `train[7%:]`), one expression of each in turn
(weights 1 and 1): the old data keeps the model from forgetting. Held out: the new dataset's
`val` and the demo's `val`, scored after the last step at the no-target threshold calibrated on
images of both that training leaves out (the new `train`'s first 20%, the demo's first 7%).
"""

import ml_collections

from unires_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, base="", lora_rank=0, steps=600)
  if not arg.base:
    raise ValueError("configs/demo_finetune.py needs the base run's work directory: "
                     "--config=configs/demo_finetune.py:base=DIR")
  try:
    config = config_lib.read_config_json(arg.base)
  except FileNotFoundError:
    raise ValueError(f"configs/demo_finetune.py: base={arg.base} holds no "
                     f"{config_lib.CONFIG_FILE}: give the work directory of a unires-demo or "
                     "unires-train run") from None
  config.train.init_from = arg.base
  config.input.data_dir = f"{arg.base}/tfds"
  config.input.tokenizer = f"{arg.base}/tokenizer"
  if arg.lora_rank:
    config.model.llm.lora.update(rank=arg.lora_rank, targets=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))

  config.input.train = ml_collections.ConfigDict({
      "new": dict(name="ref_custom", split="train[20%:]", weight=1.0),
      "old": dict(name="ref_coco_m", split="train[7%:]", weight=1.0)})
  # The threshold is chosen on images of both kinds that training leaves out: the new data's
  # first 20% and the demo's own calibration images.
  config.calibration.update(dataset="ref_custom,ref_coco_m", split="train[:20%],train[:7%]")
  config.evals = ml_collections.ConfigDict({
      "new_val": dict(dataset="ref_custom", split="val", batch_size=64, protocol="lisa",
                      resolution=0, every=0),
      "old_val": dict(dataset="ref_coco_m", split="val", batch_size=64, protocol="lisa",
                      resolution=0, every=0)})

  config.optimizer.update(learning_rate=5e-4, warmup_steps=arg.steps // 12)
  config.train.update(num_steps=arg.steps, log_every=50, checkpoint_every=arg.steps,
                      image_summary_every=0)
  return config
