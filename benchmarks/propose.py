r"""Proposal cost beside segmentation cost: images/s of the OWLv2 detector (`propose.Detector`)
and of the UniRES++ forward pass (`parallel.make_predict`), on the same number of images, in one
table with their ratio.

  python benchmarks/propose.py                                   # tiny detector, tiny model
  python benchmarks/propose.py --detector=base_patch16 --config=configs/unires_pp_7b.py \
      --config.model.llm.num_layers=4 --config.model.dtype=bfloat16 --batch_size=8 \
      --dtype=bfloat16                                          # on a GPU or TPU

What runs: the detector with random weights at the size of `--detector` (`tiny`, `base_patch16`
or `large_patch14` of `unires_jax.models.owlv2`: 960 px for base, 1008 px for large), on
`--batch_size` random RGB images of `--image_size` pixels, with `config.proposals`' part
vocabulary as its text queries. Measured for it: the jitted forward (blocking on its outputs),
and the same plus the host work of a proposal set (OWLv2 preprocessing, sigmoid, NMS, top-k:
`Detector.__call__`). UniRES++: the jitted prediction of the model of `--config` (random weights)
on a batch of the same size in its input layout (`models.synthetic.synthetic_batch`; one
expression per image). Times are the median of `--steps` calls after one warm-up call; the
compile time is the first call's. Images/s = batch / median. Weights are random: the time of a
forward pass does not depend on them.
"""

import statistics
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from unires_jax import config_lib, parallel, propose
from unires_jax.models import owlv2
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.models.unires import INPUT_KEYS

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_lib.resolve("configs/tiny.py"),
    "UniRES++ config (its `proposals` section too); override fields with --config.x=y.")
_DETECTOR = flags.DEFINE_enum("detector", "tiny", ["tiny", "base_patch16", "large_patch14"],
                              "The detector's size (random weights).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call (a multiple of the devices).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 640, "Side of the random input images.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls.")
_DTYPE = flags.DEFINE_string("dtype", None, "The detector's compute dtype (default float32).")


def timed(fn, steps: int) -> tuple[float, float]:
  """(seconds of the first call, median seconds of `steps` calls after one warm-up call)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def make_detector(config, batch_size: int) -> propose.Detector:
  """A random-weight OWLv2 of `--detector`'s size; queries: random ids of the vocabulary's
  length (the tokenizer does not change the cost)."""
  cfg = getattr(owlv2, _DETECTOR.value)()
  model = owlv2.Owlv2ForObjectDetection(cfg, dtype=_DTYPE.value, rngs=nnx.Rngs(0))
  queries = len(config.proposals.part_vocabulary) or 1
  tokens = cfg.text.max_position_embeddings
  ids = np.random.default_rng(0).integers(1, cfg.text.vocab_size - 1, (queries, tokens))
  ids[:, -1] = cfg.text.vocab_size - 1  # the end token, where the text tower pools
  proposals = config.proposals
  proposals.batch_size = batch_size
  return propose.Detector(model, cfg, ids, np.ones_like(ids), proposals)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, batch_size, steps = _CONFIG.value, _BATCH.value, _STEPS.value
  devices = jax.devices()
  print(f"device: {devices[0].device_kind} ({jax.default_backend()}) x {len(devices)}, "
        f"jax {jax.__version__}; detector {_DETECTOR.value} ({_DTYPE.value or 'float32'}), "
        f"UniRES++ compute {config.model.dtype}")
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  if overrides:
    print("overrides: " + " ".join(overrides))

  detector = make_detector(config, batch_size)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (_IMAGE_SIZE.value, _IMAGE_SIZE.value, 3), np.uint8)
            for _ in range(batch_size)]
  pixels = detector.pixels(images)
  det_compile, det_forward = timed(lambda: detector.raw_outputs(pixels), steps)
  _, det_total = timed(lambda: detector(images), steps)

  model = parallel.ShardedModel(config, parallel.make_mesh(config.mesh))
  params = model.create()
  predict = parallel.make_predict(model)
  batch = {k: v for k, v in synthetic_batch(config.model, batch_size).items() if k in INPUT_KEYS}
  sharded = parallel.shard_batch(batch, model.mesh)
  res_compile, res_forward = timed(lambda: predict(params, sharded), steps)

  rows = [
      ("OWLv2 forward", det_compile, det_forward),
      ("OWLv2 proposals (+host)", None, det_total),
      ("UniRES++ forward", res_compile, res_forward),
  ]
  print(f"\n{'':<26}{'compile s':>10}{'ms/batch':>10}{'images/s':>10}{'x UniRES++':>12}")
  for name, compile_s, seconds in rows:
    first = "-" if compile_s is None else f"{compile_s:.1f}"
    print(f"{name:<26}{first:>10}{1e3 * seconds:>10.1f}{batch_size / seconds:>10.1f}"
          f"{seconds / res_forward:>12.2f}")
  print(f"\nbatch {batch_size}; detector input {detector.model_cfg.vision.image_size} px from "
        f"{_IMAGE_SIZE.value} px images, {len(config.proposals.part_vocabulary)} part queries; "
        f"median of {steps} calls after one warm-up; 'x UniRES++' = time / UniRES++ forward")


if __name__ == "__main__":
  app.run(main)
