r"""Examples/s of the Grain pipeline from ArrayRecord beside a PyTorch RES-style loader.

  python benchmarks/input_pipeline.py --config=configs/unires_pp_7b.py --num_images=64

Both loaders produce the same samples (the same `unires_jax.data.preprocess` functions: letterbox
to both views, CLIP normalisation, union mask of the targets, tokenised prompt) from the same
RefCOCOm-layout raw data, written here at COCO size (640x480, ~8 expressions per image as in
RefCOCO). They differ in what the public PyTorch RES code (LAVT, CRIS, ReLA) does: a Dataset of
expressions whose `__getitem__` opens the image's JPEG and its mask PNGs and preprocesses them for
that one expression, where our pipeline reads one ArrayRecord per image and prepares it once for
all of its expressions. Both run in one process and one thread, so the ratio is per core.
"""

import os
import tempfile
import time
from typing import Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from unires_jax.config_lib import REPO_ROOT
from unires_jax.data import build, pipeline, preprocess, raw_io, tokenizer
from unires_jax.data.writers import common, refcocom

_CONFIG = config_flags.DEFINE_config_file(
    "config", f"{REPO_ROOT}/configs/unires_pp_7b.py", "Config (model sizes, config.input).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "Images in the generated raw dataset.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 256, "Samples timed per loader.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size of both loaders.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the data (default: a temp dir).")


def write_raw(root: str, num_images: int) -> list[str]:
  """COCO-sized scenes in the RefCOCOm layout; returns every sentence."""
  rng = np.random.default_rng(0)
  scenes = []
  for i in range(num_images):
    scene = common.random_scene(rng, i, height=480, width=640, num_objects=2,
                                first_segment_id=100 * (i + 1), first_ref_id=10 * i,
                                first_sent_id=100 * i)
    # A smooth photo-like image (upsampled noise): JPEG noise would make decoding unrealistic.
    small = rng.integers(0, 255, (15, 20, 3), dtype=np.uint8)
    scene.pixels = np.asarray(Image.fromarray(small).resize((640, 480), Image.BICUBIC))
    scenes.append(scene)
  refcocom.write(root, {"val": scenes})
  return [s for scene in scenes for ref in scene.refs for s in ref.sentences]


class TorchStyleDataset:
  """The public PyTorch RES loaders' pattern: one item per expression, files opened per item."""

  def __init__(self, raw: str, spec: preprocess.SampleSpec, tokenize):
    self._raw, self._spec, self._tokenize = raw, spec, tokenize
    self._items = []
    for record in raw_io.read_json(os.path.join(raw, "annotations", "val.json")):
      for sentence in record["sentences"]:
        self._items.append((record["img_name"], record["segment_id"], sentence["sent"]))
    proposals = raw_io.read_json(os.path.join(raw, "proposals", "val.json"))
    self._proposals = {k: {n: [raw_io.xywh_to_xyxy(b) for b in v[n]] for n in v}
                       for k, v in proposals.items()}

  def __len__(self):
    return len(self._items)

  def __getitem__(self, index):
    img_name, segment_ids, text = self._items[index]
    with Image.open(os.path.join(self._raw, "images", img_name)) as im:
      image = np.asarray(im.convert("RGB"))
    masks = []
    for seg in segment_ids if isinstance(segment_ids, list) else [segment_ids]:
      with Image.open(os.path.join(self._raw, "masks", f"{seg}.png")) as im:
        masks.append(np.asarray(im)[..., None])
    example = {
        "image": image,
        "targets": {"mask": masks},
        "proposals": {k: np.asarray(v, np.float32) for k, v in self._proposals[img_name].items()},
        "expressions": {"text": [text], "target_indices": [np.arange(len(masks))],
                        "granularity": [0], "no_target": [not masks], "id": [index]},
    }
    sample = preprocess.expand(
        preprocess.prepare_image(example, self._spec, self._tokenize), self._spec)[0]
    return {k: v for k, v in sample.items() if isinstance(v, np.ndarray)}


def examples_per_second(batches, batch_size: int, num_examples: int) -> float:
  next(batches)  # Warm-up: file opening, thread start, first decode.
  start, seen = time.perf_counter(), 0
  while seen < num_examples:
    next(batches)
    seen += batch_size
  return seen / (time.perf_counter() - start)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import torch

  torch.set_num_threads(1)
  config = _CONFIG.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="unires-input-bench-")
  raw, data_dir = os.path.join(workdir, "raw"), os.path.join(workdir, "tfds")
  print(f"writing {_NUM_IMAGES.value} images (640x480) to {raw} and building ArrayRecord ...")
  sentences = write_raw(raw, _NUM_IMAGES.value)
  build.prepare("ref_coco_m", manual_dir=raw, data_dir=data_dir)
  tok = tokenizer.train_tokenizer(
      sentences + [config.input.template, config.input.answer],
      vocab_size=config.model.llm.vocab_size, out_dir=os.path.join(workdir, "tokenizer"))
  tokenize = pipeline.hf_tokenize(tok)
  spec = preprocess.sample_spec(config.model, config.input)
  print(f"{len(sentences)} expressions on {_NUM_IMAGES.value} images; views "
        f"{spec.low_size}/{spec.high_size} px; batch {_BATCH.value}; one process, one thread")

  config.input.update(data_dir=data_dir, global_batch_size=_BATCH.value, num_threads=0,
                      prefetch_images=0)
  config.input.train = {"bench": dict(name="ref_coco_m", split="val", weight=1.0)}
  ours = iter(pipeline.train_dataset(config, tokenize, shard=pipeline.ProcessShard(0, 1)))
  grain_rate = examples_per_second(ours, _BATCH.value, _NUM_EXAMPLES.value)

  loader = torch.utils.data.DataLoader(
      TorchStyleDataset(raw, spec, tokenize), batch_size=_BATCH.value, shuffle=True,
      num_workers=0, drop_last=True, generator=torch.Generator().manual_seed(0))

  def forever():
    while True:
      yield from loader

  torch_rate = examples_per_second(forever(), _BATCH.value, _NUM_EXAMPLES.value)
  rows = [("Grain, ArrayRecord, image prepared once", grain_rate),
          ("PyTorch Dataset, raw JPEG/PNG per item", torch_rate)]
  print(f"\n{'loader':<42}{'examples/s':>12}{'ratio':>8}")
  for name, rate in rows:
    print(f"{name:<42}{rate:>12.1f}{rate / torch_rate:>8.2f}")


if __name__ == "__main__":
  app.run(main)
