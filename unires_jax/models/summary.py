"""The parameter count of each UniRES++ component, from shapes only (`unires-summary`).

The model is built under `nnx.eval_shape`, so a 7B config allocates nothing.
"""

import math

import jax
from flax import nnx

from unires_jax import models
from unires_jax.models import layers


def count_by_component(config) -> dict[str, int]:
  """{top-level submodule name: parameter count} of `config`'s model, built abstractly."""
  model = nnx.eval_shape(lambda: models.build_model(config, layers.ParamKeys(0)))
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
