"""unires-data: your own data's folder (tfds_builders/ref_custom): check it, or export a dataset to it.

  unires-data check --manual_dir=RAW
    Lists every problem of the folder RAW at once, one line each, `file:line, what: problem`
    (missing or corrupt images, masks outside the image, unknown or duplicate ids, empty
    sentences, ...), then a summary; exit status 1 when there is any. Run it before
    `tfds build tfds_builders/ref_custom --manual_dir RAW --data_dir DATA`.

  unires-data export --name=ref_coco_m --data_dir=DATA --out=RAW2 [--splits=train=train[:200],...]
    Writes the built dataset NAME (any UniRES++ builder's) as a new folder RAW2 of that layout:
    every split under its name, or the new splits --splits names, each a TFDS split of NAME
    (sliced or added: "val=val+testA", "small=train[:10%]"). Build RAW2 to get the same examples.
"""

from absl import app, flags

from unires_jax.cli import common

COMMANDS = ("check", "export")

_NAME = flags.DEFINE_string(
    "name", None, "export: the built dataset, as config.input.train.<label>.name names it "
    "(ref_coco_m, ref_coco/refcoco_unc, grefcoco, ref_custom; ':1.0.0' picks a version).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "export: the TFDS data dir NAME was built in "
                                "(default: TFDS's, ~/tensorflow_datasets).")
_SPLITS = flags.DEFINE_list(
    "splits", None, "export: NEW=SPLIT,... the folder's splits, each a TFDS split of NAME, "
    "sliced or added (train=train[:200],heldout=val+testA); default: every split as it is.")
_MASKS = flags.DEFINE_enum("masks", "rle", ["rle", "png"], "export: masks as COCO compressed "
                           "RLE in instances.json, or as PNG files masks/<annotation id>.png.")


def _check() -> int:
  from unires_jax.data import ref_custom  # pylint: disable=g-import-not-at-top

  problems, summary = ref_custom.check(common.MANUAL_DIR.value)
  for problem in problems:
    print(problem)
  splits = ", ".join(f"{s}: {summary.refs[s]} references on {summary.images.get(s, 0)} images"
                     for s in sorted(summary.refs)) or "none"
  print(f"{len(problems)} problem(s) in {common.MANUAL_DIR.value}; good: {splits}")
  return 1 if problems else 0


def _parse_splits(values: list[str] | None) -> dict[str, str] | None:
  if values is None:
    return None
  splits = {}
  for value in values:
    new, sep, source = value.partition("=")
    if not sep or not new or not source or new in splits:
      raise app.UsageError(f"--splits: {value!r} is not NEW=SPLIT, each NEW once, SPLIT a split "
                           "of --name")
    splits[new] = source
  return splits


def _export() -> int:
  from unires_jax.data import export  # pylint: disable=g-import-not-at-top  (TFDS, Grain)

  splits = _parse_splits(_SPLITS.value)
  counts = export.export(_NAME.value, _DATA_DIR.value, common.OUT.value, splits,
                         mask_format=_MASKS.value)
  print(f"wrote {common.OUT.value}: " + ", ".join(f"{s} {n} images" for s, n in counts.items()))
  return 0


_NEEDS = {"check": (common.MANUAL_DIR,), "export": (_NAME, common.OUT)}


def main(argv) -> int:
  command = common.start_command(argv, COMMANDS)
  common.require(*_NEEDS[command], who=command)
  return _check() if command == "check" else _export()


FLAG_GROUPS = (
    ("check", (common.MANUAL_DIR,)),
    ("export", (_NAME, _DATA_DIR, _SPLITS, _MASKS, common.OUT)),
)


def run():
  common.run(main, "unires-data", __doc__, FLAG_GROUPS)


if __name__ == "__main__":
  run()
