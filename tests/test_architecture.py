"""The package's dependencies run one way: each part imports only parts of its own layer or of
the layers below (`LAYERS`, top to bottom; the README's layout section lists them too), and no
import closes a cycle between parts. Read from the source with `ast` (nothing is executed), every
import counted, also those inside functions.
"""

import ast
import os
import subprocess
import sys

import pytest

from tests.repo import ROOT

PACKAGE = "unires_jax"
LAYERS = (
    ("cli",),
    ("demo", "inference", "propose", "serving", "train", "evaluation", "convert"),
    ("data", "models", "parallel", "kernels", "checkpoint", "torch"),
    ("utils", "config_lib", "metric_writer", "sharding"),
)
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imports(path: str) -> set[str]:
  """The `unires_jax` modules (or packages) that the file at `path` imports."""
  module = _module_name(path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(parent + ([base] if base else []))
      # `from unires_jax import models` imports the module unires_jax.models.
      found.update(f"{base}.{alias.name}" for alias in node.names)
      found.add(base)
  return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _part(module: str) -> str | None:
  """The part of the package `module` belongs to ("train" for unires_jax.train.step)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def _edges() -> dict[tuple[str, str], tuple[str, str]]:
  """(importing part, imported part) -> one (importing module, imported module) example."""
  edges = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      source = _module_name(path)
      for target in sorted(_imports(path)):
        a, b = _part(source), _part(target)
        if a and b and a != b and (a, b) not in edges:
          edges[(a, b)] = (source, target)
  return edges


def _cycle(edges) -> list[str] | None:
  """A cycle of parts, as [a, b, ..., a], or None."""
  graph: dict[str, list[str]] = {}
  for a, b in sorted(edges):
    graph.setdefault(a, []).append(b)
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in graph.get(node, ()):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_every_part_has_a_layer():
  parts = {_part(_module_name(os.path.join(folder, name)))
           for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE))
           for name in files if name.endswith(".py")}
  unplaced = sorted(p for p in parts - {None} if p not in LAYER_OF)
  assert not unplaced, f"{unplaced}: add them to LAYERS here and to the README's layout"


def test_no_import_goes_up_a_layer():
  upward = [f"{source} imports {target} ({a!r} is below {b!r})"
            for (a, b), (source, target) in _edges().items()
            if a in LAYER_OF and b in LAYER_OF and LAYER_OF[b] < LAYER_OF[a]]
  assert not upward, "\n".join(upward)


def test_no_import_closes_a_cycle():
  edges = _edges()
  cycle = _cycle(edges)
  assert cycle is None, "cycle " + " -> ".join(cycle) + ": " + "; ".join(
      "{} imports {}".format(*edges[(a, b)]) for a, b in zip(cycle, cycle[1:]))


def test_the_checks_see_upward_imports_and_cycles():
  """The checks themselves on a made-up graph: an upward import and a two-part cycle."""
  edges = {("models", "train"): ("unires_jax.models.x", "unires_jax.train.y"),
           ("train", "models"): ("unires_jax.train.y", "unires_jax.models.x")}
  assert _cycle(edges) in (["models", "train", "models"], ["train", "models", "train"])
  assert LAYER_OF["train"] < LAYER_OF["models"]
  assert _cycle({("a", "b"): ("", ""), ("b", "c"): ("", "")}) is None


def _modules_after_import(module: str) -> set[str]:
  code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return set(out.stdout.split())


def test_inference_imports_no_trainer_and_no_optimizer():
  """Segmenting an image builds no optimizer: `unires_jax.inference` imports nothing of
  `unires_jax.train`, and optax only if Flax itself does (flax.nnx 0.12 imports optax for its
  own `nnx.Optimizer`; when it stops, optax must be absent too, and `models/losses.py` must take
  its two loss functions from elsewhere)."""
  loaded = _modules_after_import("unires_jax.inference")
  assert not {m for m in loaded if m.startswith("unires_jax.train")}
  if "optax" not in _modules_after_import("flax.nnx"):
    assert "optax" not in loaded


@pytest.mark.parametrize("module", ["unires_jax.evaluation.evals", "unires_jax.cli.segment"])
def test_evaluation_and_segmentation_import_no_optimizer(module):
  loaded = _modules_after_import(module)
  assert not {m for m in loaded if m.startswith("unires_jax.train")}, module


def test_model_tests_collect_without_pytorch():
  """tests/models/test_unires.py runs with `pip install -e .` alone: it collects with torch and
  timm unimportable (the parity tests with PyTorch live in their own files)."""
  code = ("import sys; sys.modules['torch'] = sys.modules['timm'] = None; import pytest; "
          "sys.exit(pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', "
          "'tests/models/test_unires.py']))")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       check=False)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "tests collected" in run.stdout or "test collected" in run.stdout
