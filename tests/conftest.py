"""Shared test setup."""

import os
import shutil
import tempfile

from tests import xla

# Eight CPU devices, as a TPU slice would offer, for the sharding tests, and the fast-compile
# flags (tests/xla.py). Set before JAX starts; unsharded computations still run on device 0.
os.environ.setdefault(
    "XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {xla.FAST_COMPILE_FLAGS}")

# The CPU backend only: with libtpu installed (the test extra's jax[tpu], for the deviceless TPU
# compiles), JAX would first try to start a TPU in every test process and subprocess, which costs
# about a second and a page of warnings each. Topologies for TPU compiles work without it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a lock file per host; the xdist workers compile for TPU side by side (deviceless,
# nothing runs on a chip), so each may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # pylint: disable=wrong-import-position

pytest_plugins = ("tests.cpu_time",)  # CPU seconds per test, beside --durations' wall time

# TensorFlow (the TFDS builders) and Triton (imported by torch._dynamo, which transformers
# imports) each carry LLVM; loading Triton's after TensorFlow's crashes the process in LLVM's
# static initialisers (libtriton.so's DebugCounter, a segmentation fault), loading it first
# does not. A worker may build a dataset and then convert a PyTorch model, so Triton goes
# first where the torch extra installed it (0.2 s).
try:
  import triton  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
except ImportError:
  pass


def pytest_configure(config):
  """One persistent XLA compilation cache for the run, shared by the xdist workers and the
  training subprocesses the tests start (which compile the same train steps again).

  Set here, in the controller, before any worker or JAX starts; removed when the run ends. An
  existing JAX_COMPILATION_CACHE_DIR is left as it is. And xdist keeps the collection order
  below instead of sorting groups by their number of tests (its `--no-loadscope-reorder`, set
  here rather than in pytest.ini so that pytest without pytest-xdist still starts).
  """
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False
  if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  cache = tempfile.mkdtemp(prefix="unires-jax-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))


# The longest first, so that no long test starts when the other worker is nearly done: the
# demo's short run (tests/test_demo.py; 4-5 CPU-minutes), then the tests marked `slow`, then
# the others, each in collection order. xdist hands tests (or xdist_group groups) to its
# workers in collection order (`pytest_configure` turns off its reordering by group size);
# where the compiles of the TPU-compile, remat and sharded-step tests came last, one worker ran
# them alone for about 5 minutes at the end.
_FIRST = ("tests/test_demo.py::",)


_UNGROUPED = pytest.StashKey[set]()  # node IDs marked xdist_group that xdist will not group


@pytest.hookimpl(trylast=True)  # after pytest-xdist's, which names the groups
def pytest_collection_modifyitems(config, items):
  """The demo, then slow tests first (above), and a check of the `xdist_group` marks.

  With `--dist loadgroup` a worker's pytest-xdist appends "@<group>" to the node ID of each
  test marked `xdist_group`, and the controller sends each group to one worker. Where that
  suffix does not take (pytest 9.2 with pytest-xdist 3.8, pytest-dev/pytest-xdist#1386) the
  marks are ignored without a word and each worker would set up the group's costly fixtures
  again: those tests fail instead (`pytest_runtest_setup`).
  """
  items.sort(key=lambda item: (not item.nodeid.startswith(_FIRST),
                               item.get_closest_marker("slow") is None))  # stable otherwise
  if hasattr(config, "workerinput") and config.getoption("loadgroup", False):
    config.stash[_UNGROUPED] = {
        item.nodeid for item in items
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid.rsplit("]", 1)[-1]}


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up
def pytest_runtest_setup(item):
  if item.nodeid in item.config.stash.get(_UNGROUPED, set()):
    pytest.fail(
        f"marked xdist_group, but this pytest ({pytest.__version__}) and pytest-xdist do not "
        "group tests (pytest-dev/pytest-xdist#1386): install the test extra's pytest (setup.py)",
        pytrace=False)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> str:
  """A small ShapesParts dataset, built once per worker (tests/shapes.py): `raw/`, `tfds/` and
  `tokenizer/`."""
  from tests import shapes  # pylint: disable=g-import-not-at-top

  return shapes.write_shapes_root(str(tmp_path_factory.mktemp("shapes")))


@pytest.fixture(scope="session")
def tiny_steps():
  """The tiny train step per mesh, each compiled once per worker for the tests that train it
  in-process (tests/tiny_step.py); those tests share one worker (`xdist_group(tiny_step.GROUP)`)."""
  from tests import tiny_step  # pylint: disable=g-import-not-at-top

  return tiny_step.TinySteps()


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
  """Two workers on two cores: one intra-op thread each keeps torch from oversubscribing."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  torch.set_num_threads(1)
