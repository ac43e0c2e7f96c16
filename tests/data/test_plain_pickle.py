"""raw_io.load_plain_pickle on the refer toolkit's pickles: reads a Python 2 pickle, refuses
(without running them) pickles that reference any class or function, names the file in errors."""

import collections
import os
import pickle
import re

import pytest

from unires_jax.data import raw_io
from unires_jax.data.records import RecordError

# What Python 2's pickle (protocol 2) writes for [{'sent': 'caf\xe9', 'ref_id': 7L, 'box': (1.5,)}]:
# its `str` is a SHORT_BINSTRING of raw bytes (latin-1 here), its `long` a LONG1.
PY2_PICKLE = (b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x04caf\xe9q\x03U\x06ref_idq\x04\x8a\x01\x07"
              b"U\x03boxq\x05G?\xf8\x00\x00\x00\x00\x00\x00\x85q\x06ua.")


def _write(tmp_path, data: bytes) -> str:
  path = str(tmp_path / "refs(unc).p")
  with open(path, "wb") as f:
    f.write(data)
  return path


class _RunsCode:
  """Unpickling this would call os.mkdir(marker)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.mkdir, (self.marker,)


def test_reads_a_python2_pickle(tmp_path):
  path = _write(tmp_path, PY2_PICKLE)
  assert raw_io.load_plain_pickle(path) == [{"sent": "caf\xe9", "ref_id": 7, "box": (1.5,)}]


def test_reads_plain_data_written_by_python3(tmp_path):
  data = [{"ref_id": 1, "split": "train", "sentences": [{"sent": "a man", "sent_id": 3}],
           "ids": {4, 5}, "none": None, "ok": True, "x": -2.5}]
  path = _write(tmp_path, pickle.dumps(data, protocol=2))
  assert raw_io.load_plain_pickle(path) == data


@pytest.mark.parametrize("value, name", [
    (collections.OrderedDict(a=1), "collections.OrderedDict"),
    (collections.Counter("ab"), "collections.Counter"),
    (print, "__builtin__.print"),  # Protocol 2 writes Python 2's module names.
])
def test_refuses_any_class_or_function(tmp_path, value, name):
  path = _write(tmp_path, pickle.dumps([value], protocol=2))
  with pytest.raises(RecordError, match=rf"refs\(unc\)\.p: not a pickle of plain data: refusing "
                     rf"to load {re.escape(name)}"):
    raw_io.load_plain_pickle(path)


def test_refuses_code_without_running_it(tmp_path):
  marker = str(tmp_path / "pwned")
  path = _write(tmp_path, pickle.dumps([{"ref_id": 0}, _RunsCode(marker)], protocol=2))
  with pytest.raises(RecordError, match=r"refusing to load posix\.mkdir"):
    raw_io.load_plain_pickle(path)
  assert not os.path.exists(marker)


def test_truncated_and_missing_files_are_named(tmp_path):
  path = _write(tmp_path, PY2_PICKLE[:30])
  with pytest.raises(RecordError, match=r"refs\(unc\)\.p: not a pickle of plain data"):
    raw_io.load_plain_pickle(path)
  with pytest.raises(RecordError, match=r"nothing\.p: file does not exist"):
    raw_io.load_plain_pickle(str(tmp_path / "nothing.p"))
