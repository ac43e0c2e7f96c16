r"""Prints the parameter count of each UniRES++ component, from shapes only.

  python -m unires_jax.models.summary --config=configs/unires_pp_7b.py

The model is built under `nnx.eval_shape`, so a 7B config allocates nothing.
"""

import math
from typing import Sequence

import jax
from absl import app
from flax import nnx
from ml_collections import config_flags

from unires_jax import models
from unires_jax.config_lib import REPO_ROOT

_CONFIG = config_flags.DEFINE_config_file(
    "config", f"{REPO_ROOT}/configs/unires_pp_7b.py", "Model config file.", lock_config=True)


def count_by_component(config) -> dict[str, int]:
  """{top-level submodule name: parameter count} of `config`'s model, built abstractly."""
  model = nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0)))
  counts: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    component = str(getattr(path[0], "key", path[0]))
    counts[component] = counts.get(component, 0) + math.prod(leaf.shape)
  return counts


def format_table(counts: dict[str, int]) -> str:
  total = sum(counts.values())
  width = max(len(k) for k in counts) + 2
  lines = [f"{'component':<{width}}{'parameters':>16}{'share':>9}"]
  for name, n in counts.items():
    lines.append(f"{name:<{width}}{n:>16,}{n / total:>9.2%}")
  lines.append(f"{'total':<{width}}{total:>16,}{1:>9.2%}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(format_table(count_by_component(_CONFIG.value)))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
