r"""Examples/s of the Grain pipeline from ArrayRecord beside a PyTorch RES-style loader.

  python benchmarks/input_pipeline.py --config=configs/unires_pp_7b.py --num_images=64

Both loaders produce the same samples (the same `unires_jax.data.preprocess` functions: letterbox
to both views, CLIP normalisation, union mask of the targets, tokenised prompt) from the same
RefCOCOm-layout raw data, written here at COCO size (640x480, ~8 expressions per image as in
RefCOCO). They differ in what the public PyTorch RES code (LAVT, CRIS, ReLA) does: a Dataset of
expressions whose `__getitem__` opens the image's JPEG and its mask PNGs and preprocesses them for
that one expression, where our pipeline reads one ArrayRecord per image and prepares it once for
all of its expressions. Both run in one process and one thread, so the ratio is per core.

The data is written and built once, untimed. Each of `--repeats` runs then times both loaders in
turn, each from a fresh iterator whose first batch (a warm-up) is not timed; the table gives the
median, min and max over the runs and the ratio of the medians. Other work on the machine lowers
both rates, so the 1-minute load average before and after the timing is printed too, and so is
the kernel's transparent-huge-page mode. The Grain side keeps a shuffle window of prepared images
alive and builds 67 MB batches (full config), so it keeps faulting in fresh memory: with NumPy's
huge-page advice turned off (as under THP `never`) it ran about 1.7x slower on a 2-core VM, while
the PyTorch-style side ran as fast as before.
"""

import os
import tempfile
import time
from typing import Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from unires_jax import config_lib
from unires_jax.data import build, pipeline, preprocess, raw_io, tokenizer
from unires_jax.data.writers import common, refcocom

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_lib.resolve("configs/unires_pp_7b.py"), "Config (model sizes, config.input).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "Images in the generated raw dataset.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", 256, "Samples timed per loader and run; keep it a multiple of "
    "config.input.shuffle_window: Grain's window shuffle prepares a window's images at once.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size of both loaders.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the data (default: a temp dir).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of each loader (median, min, max).")


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


def transparent_huge_pages() -> str:
  """The kernel's THP mode ("always [madvise] never": the bracketed one is in use)."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      return f.read().strip()
  except OSError:
    return "unknown"


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
  tokenize = tokenizer.hf_tokenize(tok)
  spec = preprocess.sample_spec(config.model, config.input)
  print(f"{len(sentences)} expressions on {_NUM_IMAGES.value} images; views "
        f"{spec.low_size}/{spec.high_size} px; batch {_BATCH.value}; one process, one thread")

  config.input.update(data_dir=data_dir, global_batch_size=_BATCH.value, num_threads=0,
                      prefetch_images=0)
  config.input.train = {"bench": dict(name="ref_coco_m", split="val", weight=1.0)}
  dataset = TorchStyleDataset(raw, spec, tokenize)

  def grain_batches():
    return iter(pipeline.train_dataset(config, tokenize, shard=pipeline.ProcessShard(0, 1)))

  def torch_batches():
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=_BATCH.value, shuffle=True, num_workers=0, drop_last=True,
        generator=torch.Generator().manual_seed(0))
    while True:
      yield from loader

  loaders = {"Grain, ArrayRecord, image prepared once": grain_batches,
             "PyTorch Dataset, raw JPEG/PNG per item": torch_batches}
  rates = {name: [] for name in loaders}
  print(f"transparent huge pages: {transparent_huge_pages()}; "
        f"1-minute load average before timing: {os.getloadavg()[0]:.2f}")
  for i in range(_REPEATS.value):
    for name, batches in loaders.items():
      rates[name].append(examples_per_second(batches(), _BATCH.value, _NUM_EXAMPLES.value))
    print(f"run {i + 1}/{_REPEATS.value}: "
          + ", ".join(f"{r[-1]:.1f}" for r in rates.values()) + " examples/s")
  print(f"1-minute load average after timing: {os.getloadavg()[0]:.2f}")
  print_table(rates)


def print_table(rates: dict[str, list[float]]) -> None:
  """Median, min and max examples/s of each loader; ratio of its median to the last loader's."""
  medians = {name: float(np.median(r)) for name, r in rates.items()}
  base = list(medians.values())[-1]
  runs = len(next(iter(rates.values())))
  print(f"\n{f'examples/s over {runs} runs':<42}{'median':>9}{'min':>9}{'max':>9}{'ratio':>8}")
  for name, r in rates.items():
    print(f"{name:<42}{medians[name]:>9.1f}{min(r):>9.1f}{max(r):>9.1f}"
          f"{medians[name] / base:>8.2f}")


if __name__ == "__main__":
  app.run(main)
