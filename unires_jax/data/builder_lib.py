"""What every UniRES++ TFDS builder shares: the config with the bad-record policy, the schema.

A builder in `tfds_builders/<name>/<name>_dataset_builder.py` subclasses `Builder` below, reads its
raw layout into `schema.ImageRecord`s and yields them through `examples()`. Its folder holds
`README.md` (the description TFDS shows) and `CITATIONS.bib`.

Skipping bad records from the command line (the JSON form of `--config` sets config fields):

  tfds build tfds_builders/ref_coco --manual_dir RAW --data_dir OUT \\
      --config '{"name": "refcoco_unc", "skip_bad": true, "max_bad_fraction": 0.001}'

TFDS writes a build into `<version>.incomplete<id>` and renames it only when every split is done,
so a failed build (a bad record, too many skipped records, a kill) leaves nothing `tfds.load` or
`tfds.data_source` would pick up.
"""

import dataclasses
from typing import Any, Callable, Iterable, Iterator, TypeVar

import tensorflow_datasets as tfds

from unires_jax.data import records, schema

T = TypeVar("T")


@dataclasses.dataclass
class BuilderConfig(tfds.core.BuilderConfig):
  """`skip_bad`/`max_bad_fraction`: see `unires_jax.data.records.BadRecordPolicy`."""

  skip_bad: bool = False
  max_bad_fraction: float = 0.01


_POLICY_FIELDS = frozenset({"skip_bad", "max_bad_fraction"})
_TFDS_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))


class Builder(tfds.core.GeneratorBasedBuilder):
  """Base of the UniRES++ builders (abstract: TFDS does not register it)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: one example per image, the UniRES++ schema."}
  BUILDER_CONFIGS = [BuilderConfig(name="default")]
  HOMEPAGE: str = ""

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format, **kwargs)
    # ArrayRecord unless asked otherwise (Grain reads it with random access); a dataset already
    # built keeps the format it was built in.
    if file_format is None and not self.is_prepared():
      self.info.set_file_format("array_record", override=True)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=schema.features(), homepage=self.HOMEPAGE)

  def _create_builder_config(self, builder_config, version):
    """Accepts `--config '{"name": <a registered config>, "skip_bad": true, ...}'`.

    The CLI turns that JSON into a new config object of the registered name, which TFDS refuses
    ("Cannot name a custom BuilderConfig the same as an available BuilderConfig"). The bad-record
    policy is carried onto the registered config instead: it changes no data field, since a build
    either holds every good record or fails, so name and version stay those of the registered one.
    Any other field that differs from the registered config is still an error.
    """
    if isinstance(builder_config, BuilderConfig):
      registered = self.get_builder_config(builder_config.name, builder_config.version)
      if registered is not None and registered is not builder_config:
        differ = [f.name for f in dataclasses.fields(registered)
                  if f.init and f.name not in _TFDS_CONFIG_FIELDS | _POLICY_FIELDS
                  and getattr(registered, f.name) != getattr(builder_config, f.name)]
        if differ:
          raise ValueError(f"config {builder_config.name!r}: only {sorted(_POLICY_FIELDS)} may "
                           f"differ from the registered config, not {differ}")
        policy = {f: getattr(builder_config, f) for f in _POLICY_FIELDS}
        return dataclasses.replace(super()._create_builder_config(registered, version), **policy)
    return super()._create_builder_config(builder_config, version)

  @property
  def policy(self) -> records.BadRecordPolicy:
    cfg = self.builder_config
    return records.BadRecordPolicy(skip_bad=cfg.skip_bad, max_bad_fraction=cfg.max_bad_fraction)

  def examples(self, items: Iterable[T], to_record: Callable[[T], schema.ImageRecord],
               what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(key, example)` per item, keyed by image id; bad items follow `self.policy`."""

    def convert(item):
      record = to_record(item)
      return record.image_id, schema.to_example(record)

    yield from records.convert_all(items, convert, self.policy, what)
