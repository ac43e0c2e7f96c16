"""Building a dataset of `tfds_builders/` from Python, as `tfds build` does from the shell.

  from unires_jax.data import build
  build.prepare("ref_coco_m", manual_dir=RAW, data_dir=OUT)

The builder module is imported from the `tfds_builders` package (the repository's
`tfds_builders/<name>/` folder, installed beside `unires_jax`), the same file the command line
loads, so both paths build identical datasets.
"""

import importlib
import os

import tfds_builders

BUILDERS_DIR = os.path.dirname(os.path.abspath(tfds_builders.__file__))


def builder_class(name: str):
  """The `Builder` class of `tfds_builders/<name>/<name>_dataset_builder.py`."""
  path = os.path.join(BUILDERS_DIR, name, f"{name}_dataset_builder.py")
  if not os.path.isfile(path):
    known = sorted(d for d in os.listdir(BUILDERS_DIR)
                   if os.path.isdir(os.path.join(BUILDERS_DIR, d)) and not d.startswith("_"))
    raise ValueError(f"no builder {name!r} in {BUILDERS_DIR}; known: {known}")
  return importlib.import_module(f"tfds_builders.{name}.{name}_dataset_builder").Builder


def prepare(name: str, *, manual_dir: str, data_dir: str, config: str | None = None,
            **policy):
  """Builds `name` (with builder `config`, e.g. "refcoco_unc") into `data_dir`; returns the builder.

  Args:
    name: folder name in `tfds_builders/`.
    manual_dir: the raw data in the builder's documented layout.
    data_dir: TFDS data dir to write into (atomically: see `unires_jax.data.builder_lib`).
    config: builder config name; None for a builder's only config.
    **policy: `skip_bad`, `max_bad_fraction` (`unires_jax.data.records.BadRecordPolicy`).
  """
  import dataclasses

  import tensorflow_datasets as tfds

  from unires_jax import utils

  utils.triton_before_tensorflow()  # the build loads TensorFlow

  cls = builder_class(name)
  cfg = cls.BUILDER_CONFIGS[0] if config is None else cls.builder_configs.get(config)
  if cfg is None:
    raise ValueError(f"builder {name!r} has no config {config!r}; it has "
                     f"{sorted(cls.builder_configs)}")
  if policy:
    cfg = dataclasses.replace(cfg, **policy)
  builder = cls(data_dir=data_dir, config=cfg)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
