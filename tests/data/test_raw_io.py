"""Raw readers: COCO segmentations, restricted pickles, errors that survive pickling."""

import collections
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from unires_jax.data import raw_io
from unires_jax.data.records import RecordError


def _compressed(mask):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_rle_and_polygon_decode_to_the_mask():
  mask = np.zeros((6, 9), bool)
  mask[1:4, 2:7] = True
  np.testing.assert_array_equal(raw_io.coco_segmentation_to_mask(_compressed(mask), 6, 9, "x"),
                                mask)
  runs = raw_io.rle_counts(_compressed(mask)["counts"])
  assert sum(runs) == mask.size
  uncompressed = {"size": [6, 9], "counts": runs}
  np.testing.assert_array_equal(raw_io.coco_segmentation_to_mask(uncompressed, 6, 9, "x"), mask)
  polygon = [[2.0, 1.0, 7.0, 1.0, 7.0, 4.0, 2.0, 4.0]]
  assert raw_io.coco_segmentation_to_mask(polygon, 6, 9, "x").sum() > 0


@pytest.mark.parametrize("counts", ["", "0"])
def test_short_rle_is_an_error_not_uninitialised_memory(counts):
  with pytest.raises(RecordError, match="where.json, ann 7: bad segmentation"):
    raw_io.coco_segmentation_to_mask({"size": [4, 5], "counts": counts}, 4, 5,
                                     "where.json, ann 7")


def test_rle_of_another_size_is_an_error():
  rle = _compressed(np.ones((3, 3), bool))
  with pytest.raises(RecordError, match="differs from the image's"):
    raw_io.coco_segmentation_to_mask(rle, 4, 4, "x")


def test_plain_pickle_loads_containers(tmp_path):
  data = [{"ref_id": 1, "sentences": [{"sent": "a", "tokens": ("a",)}], "s": {1, 2}}]
  path = tmp_path / "refs.p"
  path.write_bytes(pickle.dumps(data, protocol=2))
  assert raw_io.load_plain_pickle(str(path)) == data


class _Exploit:
  def __reduce__(self):
    return (open, ("/tmp/should-not-exist-unires", "w"))


@pytest.mark.parametrize("payload", [collections.OrderedDict(a=1), _Exploit()])
def test_pickle_with_a_class_or_function_is_refused(tmp_path, payload):
  path = tmp_path / "refs.p"
  path.write_bytes(pickle.dumps(payload, protocol=2))
  with pytest.raises(RecordError, match="refs.p: not a pickle of plain data: refusing"):
    raw_io.load_plain_pickle(str(path))


def test_record_error_survives_pickling():
  err = pickle.loads(pickle.dumps(RecordError("a.jsonl:3", "malformed JSON line")))
  assert str(err) == "a.jsonl:3: malformed JSON line" and err.where == "a.jsonl:3"


def test_json_records_know_their_lines(tmp_path):
  path = tmp_path / "a.json"
  path.write_text('{"images": [\n {"id": 1},\n\n {"id": 2}], "info": {"x": [1]},\n'
                  ' "annotations": []}\n')
  value, lines = raw_io.read_json_with_lines(str(path))
  assert value == {"images": [{"id": 1}, {"id": 2}], "info": {"x": [1]}, "annotations": []}
  assert lines == {"images": [2, 4], "annotations": []}
  path.write_text('[{"a": 1},\n {"b": 2}\n {"c": 3}]')
  with pytest.raises(RecordError, match=r"a\.json:3: malformed JSON: Expecting ',' delimiter"):
    raw_io.read_json_with_lines(str(path))
  path.write_text('{"a": 1}\n\n{"b": \n')
  found = []
  assert raw_io.read_json_lines(str(path), found.append) == [(1, {"a": 1})]
  assert [str(e) for e in found] == [f"{path}:3: malformed JSON: Expecting value (column 7)"]
