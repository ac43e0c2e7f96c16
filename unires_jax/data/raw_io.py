"""Reading raw dataset files with errors that name the file: images, masks, COCO, JSON, pickles."""

import bisect
import io
import json
import os
import pickle
import re
from typing import Any

import numpy as np
from PIL import Image

from unires_jax.data.records import RecordError

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def read_image(path: str, where: str) -> tuple[bytes | np.ndarray, int, int]:
  """Reads and fully decodes an image file to check it.

  Returns:
    (image, height, width): the file's bytes when it is an RGB JPEG or PNG (stored as they are),
    otherwise the `[H, W, 3]` uint8 RGB pixels (grayscale, CMYK, palette, alpha), which the
    builder stores losslessly.

  Raises:
    RecordError: the file is missing or does not decode.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise RecordError(where, f"image file {path} does not exist") from None
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      fmt, mode, (width, height) = im.format, im.mode, im.size
      if fmt in ("JPEG", "PNG") and mode == "RGB":
        return data, height, width
      return np.asarray(im.convert("RGB")), height, width
  except (OSError, SyntaxError, ValueError) as e:
    raise RecordError(where, f"image file {path} is corrupt or not an image: {e}") from None


def read_mask_png(path: str, where: str) -> np.ndarray:
  """A PNG mask file (0 = outside, nonzero = inside) -> `[H, W]` bool."""
  try:
    with Image.open(path) as im:
      im.load()
      mask = np.asarray(im)
  except FileNotFoundError:
    raise RecordError(where, f"mask file {path} does not exist") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise RecordError(where, f"mask file {path} is corrupt or not an image: {e}") from None
  if mask.ndim == 3:
    mask = mask[..., 0]
  return mask != 0


def rle_counts(counts: str) -> list[int]:
  """The run lengths of COCO's compressed RLE string (pycocotools' `rleFrString`).

  pycocotools rejects runs that overflow the mask but decodes runs that fall short of it into
  uninitialised memory, so readers check the runs before decoding.

  Raises:
    ValueError: the string ends inside a number, or a run is negative.
  """
  runs, pos = [], 0
  while pos < len(counts):
    value, shift, more = 0, 0, True
    while more:
      if pos >= len(counts):
        raise ValueError("the counts string ends inside a number")
      c = ord(counts[pos]) - 48
      value |= (c & 0x1F) << shift
      more = bool(c & 0x20)
      pos, shift = pos + 1, shift + 5
      if not more and c & 0x10:
        value |= -1 << shift  # Sign-extend.
    if len(runs) > 2:
      value += runs[-2]  # Runs after the second are stored as differences.
    if value < 0:
      raise ValueError(f"run {len(runs)} has negative length {value}")
    runs.append(value)
  return runs


def coco_segmentation_to_mask(segmentation: Any, height: int, width: int,
                              where: str) -> np.ndarray:
  """A COCO `segmentation` (polygons, uncompressed or compressed RLE) -> `[H, W]` bool."""
  from pycocotools import mask as mask_utils  # Only the COCO-based builders need it.

  try:
    if isinstance(segmentation, list):  # Polygons [[x1, y1, x2, y2, ...], ...].
      polygons = [p for p in segmentation if len(p) >= 6]
      if not polygons:
        raise ValueError("no polygon with at least 3 points")
      rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
      rle = mask_utils.frPyObjects(segmentation, height, width)  # Uncompressed RLE.
    elif isinstance(segmentation, dict) and "counts" in segmentation:
      counts = segmentation["counts"]
      rle = {"size": list(segmentation["size"]),
             "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
      raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")
    if isinstance(rle, dict) and tuple(rle["size"]) != (height, width):
      raise ValueError(f"RLE size {list(rle['size'])} differs from the image's "
                       f"{[height, width]} (height, width)")
    if isinstance(segmentation, dict):
      counts = segmentation["counts"]
      runs = counts if isinstance(counts, list) else rle_counts(
          counts.decode("ascii") if isinstance(counts, bytes) else counts)
      if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, the image {height * width}")
    return mask_utils.decode(rle).astype(bool)
  except (ValueError, TypeError, KeyError) as e:
    raise RecordError(where, f"bad segmentation: {e}") from None


def xywh_to_xyxy(box) -> list[float]:
  x, y, w, h = (float(v) for v in box)
  return [x, y, x + w, y + h]


def read_json(path: str) -> Any:
  """Parses a JSON file; a missing or malformed file raises a RecordError naming it."""
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except FileNotFoundError:
    raise RecordError(path, "file does not exist") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RecordError(path, f"malformed JSON: {e}") from None


def _json_error(path: str, error: json.JSONDecodeError) -> RecordError:
  return RecordError(f"{path}:{error.lineno}", f"malformed JSON: {error.msg} (column "
                     f"{error.colno})")


class _LineFinder:
  """Character offset -> 1-based line number of a text."""

  def __init__(self, text: str):
    self._newlines = [m.start() for m in re.finditer("\n", text)]

  def __call__(self, offset: int) -> int:
    return bisect.bisect_right(self._newlines, offset - 1) + 1


def _skip_space(text: str, pos: int) -> int:
  return _SPACE.match(text, pos).end()


def _after_item(text: str, pos: int, close: str) -> tuple[int, bool]:
  """Past an item that ends at `pos`: (where the next item starts, False) after a comma, or
  (the end of the container, True) at its `close` bracket."""
  pos = _skip_space(text, pos)
  if text[pos:pos + 1] == close:
    return pos + 1, True
  if text[pos:pos + 1] != ",":
    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
  return _skip_space(text, pos + 1), False


def _array_with_lines(text: str, pos: int, line_of: _LineFinder) -> tuple[list, list[int], int]:
  """Parses the JSON array at `text[pos] == "["`: (items, the line each item starts on, end)."""
  items, lines = [], []
  pos = _skip_space(text, pos + 1)
  done = text[pos:pos + 1] == "]"
  pos += done
  while not done:
    item, end = _DECODER.raw_decode(text, pos)
    items.append(item)
    lines.append(line_of(pos))
    pos, done = _after_item(text, end, "]")
  return items, lines, pos


def _object_with_lines(text: str, pos: int,
                       line_of: _LineFinder) -> tuple[dict, dict[str, list[int]], int]:
  """Parses the JSON object at `text[pos] == "{"`: (object, {key: the line of each item} for
  the keys whose value is an array, end)."""
  value, lines = {}, {}
  pos = _skip_space(text, pos + 1)
  done = text[pos:pos + 1] == "}"
  pos += done
  while not done:
    key, end = _DECODER.raw_decode(text, pos)
    if not isinstance(key, str):
      raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
    pos = _skip_space(text, end)
    if text[pos:pos + 1] != ":":
      raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
    pos = _skip_space(text, pos + 1)
    if text[pos:pos + 1] == "[":
      value[key], lines[key], end = _array_with_lines(text, pos, line_of)
    else:
      value[key], end = _DECODER.raw_decode(text, pos)
    pos, done = _after_item(text, end, "}")
  return value, lines, pos


def read_json_with_lines(path: str) -> tuple[Any, list[int] | dict[str, list[int]]]:
  """Parses a JSON file and tells where its records start, for errors that name file and line.

  Returns:
    (value, lines): for a top-level array, the line each item starts on; for a top-level object,
    {key: the line each item starts on} for each key whose value is an array (COCO's `images`,
    `annotations`, ...); for anything else, [].

  Raises:
    RecordError: a missing or malformed file, naming `path:line`.
  """
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise RecordError(path, "file does not exist") from None
  except UnicodeDecodeError as e:
    raise RecordError(path, f"not UTF-8 text: {e}") from None
  line_of = _LineFinder(text)
  try:
    pos = _skip_space(text, 0)
    if text[pos:pos + 1] == "[":
      value, lines, end = _array_with_lines(text, pos, line_of)
    elif text[pos:pos + 1] == "{":
      value, lines, end = _object_with_lines(text, pos, line_of)
    else:
      (value, end), lines = _DECODER.raw_decode(text, pos), []
    if _skip_space(text, end) != len(text):
      raise json.JSONDecodeError("Extra data", text, _skip_space(text, end))
  except json.JSONDecodeError as e:
    raise _json_error(path, e) from None
  return value, lines


def read_json_lines(path: str, report) -> list[tuple[int, Any]]:
  """`(line number, record)` of each non-blank line of a JSON-lines file; a line that is no JSON
  is given to `report(RecordError naming path:line)` (which may raise) and left out.

  Raises:
    RecordError: the file is missing or not UTF-8.
  """
  try:
    with open(path, encoding="utf-8") as f:
      text_lines = f.read().splitlines()
  except FileNotFoundError:
    raise RecordError(path, "file does not exist") from None
  except UnicodeDecodeError as e:
    raise RecordError(path, f"not UTF-8 text: {e}") from None
  out = []
  for number, text in enumerate(text_lines, 1):
    if not text.strip():
      continue
    try:
      out.append((number, json.loads(text)))
    except json.JSONDecodeError as e:
      report(RecordError(f"{path}:{number}", f"malformed JSON: {e.msg} (column {e.colno})"))
  return out


class _PlainUnpickler(pickle.Unpickler):
  """Admits only what pickle builds without imports: dicts, lists, tuples, str, bytes, numbers,
  bools and None (plus sets); any class or function reference is refused."""

  _ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
              ("__builtin__", "frozenset")}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: only plain containers, strings and numbers are "
        "allowed")


def load_plain_pickle(path: str) -> Any:
  """Loads a pickle of plain data (the refer toolkit's `refs(*).p`) without running any code.

  Python 2 pickles (as released by the refer toolkit) are read with latin-1 strings.

  Raises:
    RecordError: missing file, a class or function reference in it, or a truncated pickle.
  """
  if not os.path.exists(path):
    raise RecordError(path, "file does not exist")
  with open(path, "rb") as f:
    try:
      return _PlainUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      raise RecordError(path, f"not a pickle of plain data: {e}") from None
