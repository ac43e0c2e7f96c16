"""Cloud TPU slice types: how many hosts (workers) a `--tpu` name such as `v5p-64` has.

The number in the name counts TensorCores for v4 and v5p (2 per chip, 4 chips per host) and
chips for v5e (`v5litepod`) and v6e (8 chips on a single-host slice, 4 per host beyond).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
  sizes: tuple[int, ...]  # the accepted numbers after the dash
  runtime_version: str  # the TPU VM image the slice boots
  per_host: int  # size units per host on a multi-host slice
  single_host_max: int  # the largest size that is one host


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
  return tuple(2 ** k for k in range(lo.bit_length() - 1, hi.bit_length()))


FAMILIES = {
    "v4": Family(_powers_of_two(8, 4096), "tpu-ubuntu2204-base", 8, 8),
    "v5p": Family(_powers_of_two(8, 8192), "v2-alpha-tpuv5", 8, 8),
    "v5litepod": Family((1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite", 4, 8),
    "v6e": Family((1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv6e", 4, 8),
}


@dataclasses.dataclass(frozen=True)
class TpuType:
  name: str  # the accelerator type gcloud takes, e.g. "v5p-64"
  family: str
  size: int
  hosts: int  # workers: `ssh --worker=all` runs one process on each
  runtime_version: str


def parse(name: str) -> TpuType:
  """'v5p-64' -> TpuType(hosts=8, ...); a clear error for a name that is not a slice type."""
  family, _, size = name.partition("-")
  accepted = ", ".join(f"{f}-{{{'|'.join(map(str, v.sizes))}}}" for f, v in FAMILIES.items())
  if family not in FAMILIES or not size.isdigit() or int(size) not in FAMILIES[family].sizes:
    raise ValueError(f"unknown TPU type --tpu={name!r}; accepted: {accepted}")
  spec, n = FAMILIES[family], int(size)
  hosts = 1 if n <= spec.single_host_max else n // spec.per_host
  return TpuType(name, family, n, hosts, spec.runtime_version)
