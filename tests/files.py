"""Damaged files for the bad-input tests."""


def corrupt_file(path: str) -> None:
  """Truncates a file to its first bytes (a corrupt JPEG or PNG whose header still reads)."""
  with open(path, "rb") as f:
    head = f.read(20)
  with open(path, "wb") as f:
    f.write(head)
