"""What every layer of the package shares: parameter path names, atomic writes, and how a
command-line program reports a usage error.

Nothing here knows the model, the mesh or the data; every other module may import it.

Atomic writes: a reader never sees half a file or half a directory, and a failure (or a kill)
leaves what was there before. Files are written beside their destination and renamed onto it;
directories are built in a temporary sibling renamed at the end.
"""

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from typing import Callable, Iterator

from absl import app
from etils import epath


def path_str(path) -> str:
  """A pytree key path (jax key entries or plain keys) as "llm/model/layers/0/mlp/up_proj"."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _temporary_sibling(path: str) -> str:
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """Yields a temporary local path beside `path`, renamed onto `path` when the block succeeds
  (for writers that take a file name, e.g. `PIL.Image.save`); on an error `path` is unchanged."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = _temporary_sibling(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to `path`, which may be a `gs://` path (`etils.epath`),
  creating its directory."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = epath.Path(_temporary_sibling(str(target)))
  try:
    if isinstance(data, str):
      tmp.write_text(data, encoding="utf-8")
    else:
      tmp.write_bytes(data)
    tmp.replace(target)
  finally:
    if tmp.exists():
      tmp.unlink()


@contextlib.contextmanager
def new_directory(out_dir: str, *, replace: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `out_dir` to write into, renamed to `out_dir` when the block
  ends; on an error nothing is left at `out_dir` (or, with `replace`, the old directory is).

  An existing `out_dir` is refused unless `replace`: then it is swapped out only once the new
  one is complete.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not replace:
    raise FileExistsError(f"{out_dir} already exists; choose a new output directory")
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
  try:
    yield tmp
    old = None
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.replace(out_dir, old)  # onto an empty directory, which rename(2) allows
    try:
      os.rename(tmp, out_dir)
    except BaseException:
      if old:
        os.replace(old, out_dir)
      raise
    if old:
      shutil.rmtree(old)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def brief_usage_errors(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int]:
  """`main` for `absl.app.run`, printing an `app.UsageError` as "prog: error: ..." and one line
  on where the help is (absl would print the whole help text first), then returning 1."""

  def wrapped(argv: list[str]) -> int:
    try:
      return main(argv) or 0
    except app.UsageError as e:
      prog = os.path.basename(sys.argv[0])
      print(f"{prog}: error: {e}\n{prog}: see `{prog} --help` for the flags", file=sys.stderr)
      return 1

  return wrapped


def triton_before_tensorflow() -> None:
  """Imports Triton (when installed) before TensorFlow loads: with the pinned packages, Triton
  imported after TensorFlow crashes the process (SIGSEGV). Call it where TensorFlow may load.
  If TensorFlow is already loaded, nothing can be done here (`check_triton_after_tensorflow`)."""
  if ("triton" not in sys.modules and "tensorflow" not in sys.modules
      and importlib.util.find_spec("triton") is not None):
    import triton  # pylint: disable=g-import-not-at-top,unused-import


def check_triton_after_tensorflow(what: str) -> None:
  """An ImportError instead of the crash, before `what` imports Triton after TensorFlow."""
  if ("tensorflow" in sys.modules and "triton" not in sys.modules
      and importlib.util.find_spec("triton") is not None):
    raise ImportError(
        f"{what} imports Triton, and TensorFlow is already loaded in this process: with the "
        "pinned packages that order crashes Python (SIGSEGV). Import unires_jax.torch (or "
        "triton) before building TFDS datasets, or use another process")
