"""Object and part proposals from an OWLv2 detector, for images and for raw dataset splits.

`Detector` turns images into the boxes UniRES++ pools features in (`config.proposals`):
  objects  the top `object_k` boxes by objectness (sigmoid above `object_min_score`) after
           class-agnostic NMS at `object_nms_iou`;
  parts    the boxes whose best score against the text queries of `part_vocabulary` (each
           written into `query_template`) is above `part_min_score`, NMS at `part_nms_iou`, the
           top `part_k` by that score.
Boxes are x1, y1, x2, y2 pixels of the image, clipped to it.

`propose_split` runs it over one split of a raw dataset (`unires_jax.data.raw_images`) and writes
the builders' proposal file (`unires_jax.data.proposals`). The split's images, in a fixed
order, fall into shards of `shard_images`; process p of n takes shards p, p + n, ... and writes
each one atomically to `<file>.shards/` as soon as it is done, so a rerun skips the finished
shards and any number of processes gives the same shards. The process that finds every shard
written merges them into the file (sorted by image name: the same bytes every time). The shard
folder holds the settings it was made with (`settings.json`: the detector's files by content,
`config.proposals`); a rerun with other settings stops and names what differs.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from unires_jax import utils
from unires_jax.convert import owlv2 as convert_owlv2
from unires_jax.data import proposals, raw_images
from unires_jax.models import detection, owlv2

log = logging.getLogger(__name__)

FIELDS = ("batch_size", "object_k", "object_min_score", "object_nms_iou", "part_k",
          "part_min_score", "part_nms_iou", "part_vocabulary", "query_template", "pad_value",
          "preprocess_threads", "shard_images")


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """A ValueError naming the field of `config.proposals` that is missing or out of range."""
  missing = [f for f in FIELDS if f not in cfg]
  if missing:
    raise ValueError(f"config.proposals has no field {missing[0]!r}; fields: {FIELDS}")
  for field in ("batch_size", "preprocess_threads", "shard_images"):
    if cfg[field] < 1:
      raise ValueError(f"config.proposals.{field}={cfg[field]} must be >= 1")
  for field in ("object_k", "part_k"):
    if cfg[field] < 0:
      raise ValueError(f"config.proposals.{field}={cfg[field]} must be >= 0")
  for field in ("object_min_score", "object_nms_iou", "part_min_score", "part_nms_iou",
                "pad_value"):
    if not 0.0 <= cfg[field] <= 1.0:
      raise ValueError(f"config.proposals.{field}={cfg[field]} must lie in [0, 1]")
  if cfg.part_k and not cfg.part_vocabulary:
    raise ValueError("config.proposals.part_vocabulary is empty but part_k > 0")
  if "{part}" not in cfg.query_template:
    raise ValueError(f"config.proposals.query_template={cfg.query_template!r} has no {{part}}")


@dataclasses.dataclass(frozen=True)
class ImageProposals:
  """One image's proposals: `[n, 4]` / `[m, 4]` float32 x1, y1, x2, y2 pixels, best first."""

  object_boxes: np.ndarray
  part_boxes: np.ndarray


class Detector:
  """OWLv2 -> object and part proposals of images (see the module doc).

  Args:
    model: the detector (`models.owlv2.Owlv2ForObjectDetection`) and `model_cfg` its config.
    query_ids, query_mask: `[queries, tokens]` the tokenized part queries (`from_pretrained`
      writes `cfg.part_vocabulary` into `cfg.query_template` and tokenizes them).
    cfg: `config.proposals`.
  """

  def __init__(self, model: owlv2.Owlv2ForObjectDetection, model_cfg: ml_collections.ConfigDict,
               query_ids: np.ndarray, query_mask: np.ndarray, cfg: ml_collections.ConfigDict):
    check_config(cfg)
    self.cfg, self.model_cfg = cfg, model_cfg
    self._ids = jnp.asarray(query_ids, jnp.int32)
    self._mask = jnp.asarray(query_mask, jnp.int32)
    devices = jax.local_devices()
    if cfg.batch_size % len(devices):
      raise ValueError(f"config.proposals.batch_size={cfg.batch_size} is not a multiple of this "
                       f"process's {len(devices)} devices")
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(
        state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def forward(state, pixels, ids, mask):
      """pixels `[batch, size, size, 3]` -> objectness `[batch, patches]`, part logits
      `[batch, patches, queries]`, boxes `[batch, patches, 4]` (cx, cy, w, h)."""
      batch = pixels.shape[0]
      out = nnx.merge(graphdef, state)(
          pixels, jnp.broadcast_to(ids, (batch, *ids.shape)),
          jnp.broadcast_to(mask, (batch, *mask.shape)))
      return out["objectness_logits"], out["logits"], out["pred_boxes"]

    self._forward = jax.jit(forward, in_shardings=(None, rows, None, None), out_shardings=rows)

  @classmethod
  def from_pretrained(cls, detector_dir: str, cfg: ml_collections.ConfigDict, *,
                      dtype: Any = None) -> "Detector":
    """The detector of a transformers OWLv2 directory (`Owlv2ForObjectDetection.save_pretrained`
    with its tokenizer, e.g. google/owlv2-base-patch16-ensemble), computing in `dtype` (None:
    float32)."""
    import transformers  # pylint: disable=g-import-not-at-top  (heavy; needed here only)

    check_config(cfg)
    model, model_cfg = convert_owlv2.from_pretrained(detector_dir, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(detector_dir)
    queries = [cfg.query_template.format(part=p) for p in cfg.part_vocabulary] or [""]
    tokens = tokenizer(queries, padding="max_length", truncation=True, return_tensors="np",
                       max_length=model_cfg.text.max_position_embeddings)
    return cls(model, model_cfg, tokens["input_ids"], tokens["attention_mask"], cfg)

  def pixels(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Images -> `[batch_size, size, size, 3]` detector input, zero rows after the images."""
    size = self.model_cfg.vision.image_size
    out = np.zeros((self.cfg.batch_size, size, size, 3), np.float32)  # one compiled shape

    def fill(i: int) -> None:
      out[i] = detection.owlv2_preprocess(images[i], size, self.cfg.pad_value)

    # NumPy's array work releases the GIL: threads preprocess images side by side.
    with concurrent.futures.ThreadPoolExecutor(self.cfg.preprocess_threads) as pool:
      list(pool.map(fill, range(len(images))))
    return out

  def raw_outputs(self, pixels: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`pixels` -> (objectness, part logits, boxes) on the devices (not waited for)."""
    return self._forward(self._state, pixels, self._ids, self._mask)

  def __call__(self, images: Sequence[np.ndarray]) -> list[ImageProposals]:
    """RGB uint8 images `[h, w, 3]` (any number) -> their proposals, in order."""
    out = []
    for start in range(0, len(images), self.cfg.batch_size):
      chunk = images[start:start + self.cfg.batch_size]
      objectness, logits, boxes = jax.device_get(self.raw_outputs(self.pixels(chunk)))
      for i, image in enumerate(chunk):
        out.append(self._boxes(objectness[i], logits[i], boxes[i], image.shape[:2]))
    return out

  def _boxes(self, objectness: np.ndarray, logits: np.ndarray, boxes: np.ndarray,
             size: tuple[int, int]) -> ImageProposals:
    cfg = self.cfg
    objects = detection.objectness_proposals(
        objectness, boxes, k=cfg.object_k, iou_threshold=cfg.object_nms_iou,
        min_score=cfg.object_min_score, target_size=size)["boxes"]
    parts = np.zeros((0, 4), np.float32)
    if cfg.part_k:
      (found,) = detection.postprocess(logits[None], boxes[None], threshold=cfg.part_min_score,
                                       target_sizes=[size])
      h, w = size
      clipped = np.clip(found["boxes"], 0, np.array([w, h, w, h], np.float32))
      inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
      clipped, scores = clipped[inside], found["scores"][inside]
      parts = clipped[detection.nms(clipped, scores, cfg.part_nms_iou, max_keep=cfg.part_k)]
    return ImageProposals(np.asarray(objects, np.float32), np.asarray(parts, np.float32))


def _read_image(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()  # streamed, in blocks


def settings(detector_dir: str, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the proposals depend on: the detector's config.json and weight files by content
  (SHA-256, streamed: 0.24 s for 300 MB on a 2-core host, once per run), and
  `config.proposals` (batch and shard sizes aside). `detector` records where the detector was,
  for messages only (a copy elsewhere is the same detector)."""
  weights = sorted([name, os.path.getsize(os.path.join(detector_dir, name)),
                    _sha256(os.path.join(detector_dir, name))]
                   for name in os.listdir(detector_dir)
                   if name.endswith((".safetensors", ".bin")))
  fields = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in cfg.items()
            if k not in ("batch_size", "preprocess_threads")}
  return {"detector": os.path.abspath(detector_dir),
          "detector_config_sha256": _sha256(os.path.join(detector_dir, "config.json")),
          "detector_weights": weights, "proposals": fields}


@dataclasses.dataclass(frozen=True)
class Summary:
  """What `propose_split` did in this process."""

  path: str | None  # the proposal file, when this process merged it
  shards_done: int  # shards this process wrote
  shards_skipped: int  # this process's shards found finished
  images: int  # images this process proposed for
  bad_images: list[str]  # file names skipped as unreadable (skip_bad), this process


def propose_split(detect: Callable[[Sequence[np.ndarray]], list[ImageProposals]],
                  dataset: str, manual_dir: str, split: str, *, builder_config: str | None,
                  settings_record: dict[str, Any], shard_images: int, process_index: int = 0,
                  process_count: int = 1, skip_bad: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Summary:
  """Writes `proposals.path(manual_dir, dataset, split, builder_config)` (see the module doc).

  Args:
    detect: images -> proposals (a `Detector`).
    settings_record: what the proposals depend on (`settings`): kept in the shard folder, and
      checked against it on a rerun.
    shard_images: images per shard.
    process_index, process_count: this process and how many share the work.
    skip_bad: an image that does not decode is left out and counted (else a ValueError names it).
    progress: called with (images done, images of this process) after each shard.

  Raises:
    ValueError: an unreadable image (without skip_bad), or shards made with other settings.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
  images = raw_images.images(dataset, manual_dir, split, builder_config)
  target = proposals.path(manual_dir, dataset, split, builder_config)
  shard_dir = target + ".shards"
  _check_settings(shard_dir, settings_record)
  shards = [images[i:i + shard_images] for i in range(0, len(images), shard_images)]
  names = [os.path.join(shard_dir, f"{s:05d}-of-{len(shards):05d}.json")
           for s in range(len(shards))]
  mine = range(process_index, len(shards), process_count)
  todo = [s for s in mine if not os.path.exists(names[s])]
  total = sum(len(shards[s]) for s in todo)
  done, bad = 0, []
  for s in todo:
    entries, shard_bad = _propose_shard(detect, shards[s], skip_bad)
    utils.write_atomic(names[s], json.dumps({"entries": entries, "bad": shard_bad}))
    bad += shard_bad
    done += len(shards[s])
    if progress is not None:
      progress(done, total)
  merged = None
  if all(os.path.exists(n) for n in names):
    merged = _merge(names, target)
  return Summary(path=merged, shards_done=len(todo), shards_skipped=len(mine) - len(todo),
                 images=done, bad_images=bad)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """What differs between two `settings` records, each as "what: shards' value, this run's"."""
  out = []
  for key in sorted(old.keys() | new.keys()):
    if key == "detector" or old.get(key) == new.get(key):
      continue
    if key == "detector_weights":
      describe = lambda files: ", ".join(f"{f[0]} sha256 {f[2][:12]}" if len(f) > 2 else
                                         f"{f[0]} (size only)" for f in files) or "no files"
      out.append(f"weights {describe(old.get(key, []))} vs {describe(new.get(key, []))}")
    elif key == "proposals":
      a, b = old.get(key, {}), new.get(key, {})
      out += [f"config.proposals.{k} {a.get(k)!r} vs {b.get(k)!r}"
              for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    else:
      out.append(f"{key} {old.get(key)} vs {new.get(key)}")
  return out


def _check_settings(shard_dir: str, record: dict[str, Any]) -> None:
  path = os.path.join(shard_dir, "settings.json")
  text = json.dumps(record, sort_keys=True, indent=1)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    differences = _differences(old, json.loads(text))
    if differences:
      raise ValueError(
          f"{shard_dir} holds shards made with other settings: {'; '.join(differences)} (the "
          f"detector {old.get('detector', '(not recorded)')} vs this run's "
          f"{record['detector']}): remove the folder to start over, or run with those "
          "settings")
  else:
    utils.write_atomic(path, text)  # several processes write the same bytes


def _propose_shard(detect, shard: list[tuple[str, str]], skip_bad: bool
                   ) -> tuple[dict[str, dict], list[str]]:
  pixels, kept, bad = [], [], []
  for name, path in shard:
    try:
      pixels.append(_read_image(path))
      kept.append(name)
    except (OSError, SyntaxError, ValueError) as e:
      if not skip_bad:
        raise ValueError(f"image {path} cannot be read ({e}); fix or remove it, or run with "
                         "--skip_bad to leave it out") from None
      log.warning("skipping unreadable image %s: %s", path, e)
      bad.append(name)
  found = detect(pixels)
  return ({name: proposals.entry(p.object_boxes, p.part_boxes) for name, p in zip(kept, found)},
          bad)


def _merge(names: list[str], target: str) -> str:
  entries, bad = {}, []
  for name in names:
    with open(name, encoding="utf-8") as f:
      shard = json.load(f)
    entries.update(shard["entries"])
    bad += shard["bad"]
  utils.write_atomic(target, proposals.dumps(entries))
  if bad:
    log.warning("%d unreadable image(s) have no proposals in %s (first: %s)", len(bad), target,
                bad[0])
  return target


class Rate:
  """Progress lines (or a tqdm bar) with images/s."""

  def __init__(self, what: str, show_bar: bool):
    self._what, self._start, self._bar = what, time.time(), None
    if show_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(desc=what, unit="img")

  def __call__(self, done: int, total: int) -> None:
    rate = done / max(time.time() - self._start, 1e-9)
    if self._bar is not None:
      self._bar.total = total
      self._bar.n = done
      self._bar.set_postfix_str(f"{rate:.1f} img/s")
      self._bar.refresh()
    else:
      log.info("%s: %d / %d images, %.1f images/s", self._what, done, total, rate)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
