"""Errors for bad raw records, and the policy that skips them up to a bounded fraction."""

import dataclasses
from typing import Callable, Iterable, Iterator, TypeVar

from absl import logging

T = TypeVar("T")
R = TypeVar("R")


class RecordError(ValueError):
  """A raw record that cannot be converted; the message names the file and the record."""

  def __init__(self, where: str, message: str):
    super().__init__(f"{where}: {message}")
    self.where, self.message = where, message

  def __reduce__(self):  # Picklable, e.g. between Beam workers.
    return type(self), (self.where, self.message)


class TooManyBadRecords(RuntimeError):
  """More than `max_bad_fraction` of the records were bad."""


@dataclasses.dataclass
class BadRecordPolicy:
  """What a builder does with a `RecordError`.

  `skip_bad=False` (the default) stops at the first bad record. With `skip_bad=True` bad records are
  logged, counted and skipped, and `check()` fails when more than `max_bad_fraction` of all records
  were bad, so a broken raw directory never builds into a silently small dataset.
  """

  skip_bad: bool = False
  max_bad_fraction: float = 0.01

  def __post_init__(self):
    if not 0.0 <= self.max_bad_fraction <= 1.0:
      raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must lie in [0, 1]")

  def check(self, num_bad: int, num_total: int, what: str) -> None:
    """Raises TooManyBadRecords when `num_bad / num_total` exceeds the allowed fraction."""
    if num_total and num_bad / num_total > self.max_bad_fraction:
      raise TooManyBadRecords(
          f"{what}: {num_bad} of {num_total} records are bad ({num_bad / num_total:.1%}), more "
          f"than max_bad_fraction={self.max_bad_fraction:.1%}; the errors are logged above")


def convert_all(
    items: Iterable[T],
    convert: Callable[[T], R],
    policy: BadRecordPolicy,
    what: str,
) -> Iterator[R]:
  """Yields `convert(item)` for each item, applying `policy` to `RecordError`s.

  Args:
    items: raw records.
    convert: raises `RecordError` for a bad record.
    policy: stop at the first bad record, or skip them up to a fraction.
    what: names the split/source in the final count and error.
  """
  num_bad = num_total = 0
  for item in items:
    num_total += 1
    try:
      result = convert(item)
    except RecordError as e:
      if not policy.skip_bad:
        raise
      num_bad += 1
      logging.warning("Skipping bad record (%d so far): %s", num_bad, e)
      continue
    yield result
  if num_bad:
    logging.warning("%s: skipped %d of %d records", what, num_bad, num_total)
  policy.check(num_bad, num_total, what)
