"""The Grain input pipeline: TFDS ArrayRecord datasets -> batches of the model's fields.

Training, per dataset in `config.input.train`:

  tfds.data_source (random access, one record per image)
    -> this process's images ([process_index::process_count])
    -> global shuffle, reshuffled every epoch, repeated forever
    -> prepare_image (decode, letterbox both views, masks, proposals, tokenize)   [threads]
    -> expand: one sample per expression
    -> window shuffle (mixes the expressions of different images)
  then the datasets are mixed by weight (per sample) and batched.

Evaluation (`eval_dataset`) reads one split once, in order, expands every expression (evaluation
counts expressions, not images) and pads the last batch with `valid = 0` samples.

Every stage is deterministic under `config.input.seed`, and the iterator's `get_state()` /
`set_state()` resume at the exact next batch (the training checkpoint saves that state).
"""

import dataclasses
import os
import re
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from unires_jax.data import preprocess


def _version_key(name: str) -> tuple[int, ...] | None:
  parts = name.split(".")
  return tuple(map(int, parts)) if len(parts) == 3 and all(p.isdigit() for p in parts) else None


def dataset_dir(name: str, data_dir: str | None) -> str:
  """The folder of a built dataset: `data_dir/<name>[/<config>]/<version>`.

  `name` is "ref_coco_m", "ref_coco/refcoco_unc" or either with ":1.0.0"; without a version the
  newest is taken, without a config the only one. The folder is found on disk rather than
  through TFDS's registry, where TFDS's own `ref_coco` would shadow ours.
  """
  import tensorflow_datasets as tfds

  name, _, version = name.partition(":")
  root = os.path.join(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR), name)
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"dataset {name!r} is not built in {os.path.dirname(root)}: build it with "
        f"`tfds build tfds_builders/{name.split('/')[0]} --manual_dir RAW --data_dir DIR`")
  entries = sorted(d for d in os.listdir(root) if not d.startswith("."))
  versions = [d for d in entries if _version_key(d) and "incomplete" not in d]
  if not versions:
    configs = [d for d in entries if os.path.isdir(os.path.join(root, d))]
    if len(configs) != 1:
      raise ValueError(f"dataset {name!r} has the configs {configs}: name one, e.g. "
                       f"{name}/{configs[0] if configs else '<config>'}")
    return dataset_dir(f"{name}/{configs[0]}" + (f":{version}" if version else ""), data_dir)
  if version and version not in versions:
    raise FileNotFoundError(f"dataset {name!r} has no version {version} in {root}; it has "
                            f"{versions}")
  return os.path.join(root, version or max(versions, key=_version_key))


def open_source(name: str, split: str, data_dir: str | None):
  """`tfds` random-access source of a built dataset's split (see `dataset_dir` for `name`).

  `split` is a split's name or TFDS's slicing of splits ("train[:300]", "train[10%:]",
  "val+testA"; one record per image, so a slice cuts between images). Its examples are TFDS's
  NumPy decoding; only the target masks go through `decoding.MaskDecoder` (the same arrays,
  decoded faster).
  """
  import tensorflow_datasets as tfds

  from unires_jax.data import decoding

  builder = tfds.builder_from_directory(dataset_dir(name, data_dir))
  splits = sorted(builder.info.splits)
  for part in split.split("+"):
    named = re.fullmatch(r"\s*([\w-]+)\s*(\[[^\]]*\])?\s*", part)
    if named is None or named.group(1) not in splits:
      raise ValueError(f"unknown split {split!r} of dataset {name!r}; it has {splits} (slices "
                       "as TFDS writes them: 'train[:300]', 'train[10%:]')")
  try:
    return builder.as_data_source(split=split,
                                  decoders={"targets": {"mask": decoding.MaskDecoder()}})
  except (ValueError, AssertionError) as e:  # TFDS's word on a malformed or empty slice
    raise ValueError(f"split {split!r} of dataset {name!r}: {e}") from None


class _Prepare(grain.transforms.RandomMap):
  """Record -> prepared image (see `preprocess.prepare_image`); the rng (seeded by the pipeline
  seed and the element's position) jitters target-box proposals."""

  def __init__(self, spec: preprocess.SampleSpec, tokenize, extra: dict[str, Any]):
    self._spec, self._tokenize, self._extra = spec, tokenize, extra

  def random_map(self, example, rng: np.random.Generator):
    return preprocess.prepare_image(example, self._spec, self._tokenize, self._extra, rng)


class _Expand(grain.experimental.FlatMapTransform):
  """Prepared image -> one sample per expression."""

  max_fan_out = 1 << 16  # Only bounds the MapDataset variant; the pipeline expands an iterator.

  def __init__(self, spec: preprocess.SampleSpec):
    self._spec = spec

  def flat_map(self, prepared):
    return preprocess.expand(prepared, self._spec)


def _to_model_dtypes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {**batch, "masks": batch["masks"].astype(np.float32)}


def _compact(sample: dict[str, Any]) -> dict[str, Any]:
  """Masks as bool while samples wait in the shuffle window (a quarter of the memory)."""
  return {**sample, "masks": sample["masks"].astype(bool)}


@dataclasses.dataclass(frozen=True)
class ProcessShard:
  """This process's share of every dataset and of the global batch."""

  index: int
  count: int

  @classmethod
  def current(cls) -> "ProcessShard":
    return cls(jax.process_index(), jax.process_count())

  def batch_size(self, global_batch_size: int) -> int:
    if global_batch_size % self.count:
      raise ValueError(f"config.input.global_batch_size={global_batch_size} is not divisible by "
                       f"the {self.count} processes")
    return global_batch_size // self.count


def _images(source, shard: ProcessShard) -> grain.MapDataset:
  ds = grain.MapDataset.source(source)
  if len(ds) < shard.count:
    raise ValueError(f"{len(ds)} images cannot be shared by {shard.count} processes")
  return ds[shard.index::shard.count]


def _read_options(input_cfg) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=input_cfg.num_threads,
                           prefetch_buffer_size=input_cfg.prefetch_images)


def train_dataset(config: ml_collections.ConfigDict, tokenize, *,
                  shard: ProcessShard | None = None) -> grain.IterDataset:
  """Infinite training batches of this process (`global_batch_size / process_count` samples).

  Args:
    config: the full config (`config.model` for shapes, `config.input` for the data).
    tokenize: texts -> ids, e.g. `tokenizer.load_tokenize(config.input.tokenizer)`.
    shard: this process's share; defaults to the JAX process.

  Each batch holds the model's fields (`unires_jax.models.unires`) plus `granularity`,
  `expression_id`, `dataset` (index into `config.input.train`), `original_size`, `scale`, `valid`.
  """
  shard = shard or ProcessShard.current()
  icfg = config.input
  spec = preprocess.sample_spec(config.model, icfg)
  if not icfg.train:
    raise ValueError("config.input.train names no dataset")
  datasets, weights = [], []
  for i, (label, d) in enumerate(sorted(icfg.train.items())):
    if d.weight <= 0:
      raise ValueError(f"config.input.train.{label}.weight must be positive, got {d.weight}")
    source = open_source(d.name, d.split, icfg.data_dir)
    ds = (_images(source, shard)
          .shuffle(seed=icfg.seed + i)
          .repeat()
          .random_map(_Prepare(spec, tokenize, {"dataset": np.int32(i)}), seed=icfg.seed + i)
          .to_iter_dataset(_read_options(icfg)))
    ds = grain.experimental.FlatMapIterDataset(ds, _Expand(spec)).map(_compact)
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=icfg.shuffle_window, seed=icfg.seed + 1000 + i)
    datasets.append(ds)
    weights.append(d.weight)
  mixed = datasets[0] if len(datasets) == 1 else grain.IterDataset.mix(datasets, weights)
  return mixed.batch(shard.batch_size(icfg.global_batch_size), drop_remainder=True).map(
      _to_model_dtypes)


class _PadBatch(grain.transforms.Map):
  """Pads a short last batch to `size` with `valid = 0` samples."""

  def __init__(self, size: int):
    self._size = size

  def map(self, batch):
    n = len(batch["valid"])
    if n == self._size:
      return batch
    pad = preprocess.padding_like({k: v[0] for k, v in batch.items()})
    return {k: np.concatenate([v, np.stack([pad[k]] * (self._size - n))])
            for k, v in batch.items()}


def eval_dataset(config: ml_collections.ConfigDict, name: str, split: str, tokenize, *,
                 batch_size: int, shard: ProcessShard | None = None) -> grain.IterDataset:
  """One in-order pass over every expression of `name`/`split` held by this process.

  Every batch has `batch_size` rows; rows with `valid == 0` are padding. Besides the model's
  fields a batch holds `granularity`, `expression_id`, `image_index` (into the split's source, to
  fetch the ground truth at the original size), `original_size` and `scale` (to undo the
  letterbox: see `unires_jax.data.preprocess`).
  """
  shard = shard or ProcessShard.current()
  icfg = config.input
  spec = preprocess.sample_spec(config.model, icfg)
  source = open_source(name, split, icfg.data_dir)
  ds = grain.MapDataset.range(len(source))[shard.index::shard.count]
  ds = ds.map(_ReadAndPrepare(source, spec, tokenize))
  ds = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(_read_options(icfg)),
                                             _Expand(spec))
  return ds.batch(batch_size, drop_remainder=False).map(_PadBatch(batch_size)).map(
      _to_model_dtypes)


class _ReadAndPrepare(grain.transforms.Map):
  """Image index -> prepared image that remembers its index (for the evaluator's ground truth)."""

  def __init__(self, source, spec: preprocess.SampleSpec, tokenize):
    self._source, self._spec, self._tokenize = source, spec, tokenize

  def map(self, index):
    return preprocess.prepare_image(self._source[index], self._spec, self._tokenize,
                                    {"image_index": np.int64(index)})
