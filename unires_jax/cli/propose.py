"""unires-propose: object and part proposals of a raw dataset split, from an OWLv2 detector.

  unires-propose --detector=OWLV2_DIR --manual_dir=RAW --split=SPLIT [--dataset=ref_coco_m]

Writes the object and part proposals of one split of a raw dataset, from an OWLv2 detector (a
transformers directory with its tokenizer), to the file the dataset's builder reads
(`unires_jax.data.proposals`: RAW/proposals/<split>.json; ref_coco: RAW/proposals/<config>/...),
with the settings of `config.proposals` (`--config`, default unires_pp_7b; override fields with
--config.proposals.part_k=8 ...). Build the dataset after it.

Several processes share the split: `--num_processes=N --process_id=I` (independent processes, no
communication) or a jax.distributed run (`--distributed`, `--coordinator_address`). Each writes
its shards as they finish; a rerun skips finished shards; the process that finds all shards
written merges them into the file.
"""

from absl import app, flags

from unires_jax.cli import common
from unires_jax.data import proposals

_SPLIT = flags.DEFINE_string("split", None, "The split to propose for (val, testA, ...).")
_DATASET = flags.DEFINE_enum("dataset", "ref_coco_m", list(proposals.DATASETS),
                             "The raw dataset's layout.")
_BUILDER_CONFIG = flags.DEFINE_string(
    "builder_config", None, "ref_coco only: which refs file (refcoco_unc, refcoco+_unc, "
    "refcocog_umd, refcocog_google).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "Leave out (and count) images that do not "
                              "decode, instead of stopping at the first.")


def _process() -> tuple[int, int]:
  """(this process's index, number of processes) that share the split."""
  import jax  # pylint: disable=g-import-not-at-top

  if common.FLAGS.coordinator_address or common.FLAGS.distributed:
    return jax.process_index(), jax.process_count()
  count = common.FLAGS.num_processes
  if count is None:
    if common.FLAGS.process_id not in (None, 0):
      raise app.UsageError("--process_id needs --num_processes")
    return 0, 1
  if common.FLAGS.process_id is None or not 0 <= common.FLAGS.process_id < count:
    raise app.UsageError(f"--num_processes={count} needs --process_id in [0, {count})")
  return common.FLAGS.process_id, count


def main(argv) -> int:
  common.start(argv)
  common.require(common.DETECTOR, common.MANUAL_DIR, _SPLIT)
  if (_DATASET.value == "ref_coco") != (_BUILDER_CONFIG.value is not None):
    raise app.UsageError("--builder_config names ref_coco's refs file (e.g. refcoco_unc); "
                         "give it with --dataset=ref_coco and only then")
  index, count = _process()
  from unires_jax import propose  # pylint: disable=g-import-not-at-top  (jax, transformers)

  cfg = common.CONFIG.value.proposals
  detector = common.detector_from_dir(common.DETECTOR.value, cfg)
  rate = propose.Rate(f"propose {_DATASET.value} {_SPLIT.value}",
                      show_bar=common.PROGRESS.value)
  try:  # a bad raw file or image is named (common.run: one line); finished shards stay
    summary = propose.propose_split(
        detector, _DATASET.value, common.MANUAL_DIR.value, _SPLIT.value,
        builder_config=_BUILDER_CONFIG.value,
        settings_record=propose.settings(common.DETECTOR.value, cfg),
        shard_images=cfg.shard_images, process_index=index, process_count=count,
        skip_bad=_SKIP_BAD.value, progress=rate)
  finally:
    rate.close()
  print(f"process {index} of {count}: {summary.shards_done} shard(s) written "
        f"({summary.images} images, {len(summary.bad_images)} unreadable), "
        f"{summary.shards_skipped} already done")
  print(f"wrote {summary.path}" if summary.path else
        "other processes' shards are not all written yet: the last to finish writes the file")
  return 0


FLAG_GROUPS = (
    ("input", (common.DETECTOR, common.MANUAL_DIR, _SPLIT, _DATASET, _BUILDER_CONFIG, _SKIP_BAD)),
    ("settings", (common.CONFIG, common.PROGRESS)),
)


def run():
  common.run(main, "unires-propose", __doc__, FLAG_GROUPS,
             default_config="configs/unires_pp_7b.py")


if __name__ == "__main__":
  run()
