"""Shared test setup."""

import os

# Eight CPU devices, as a TPU slice would offer, for the sharding tests. Set before JAX starts;
# unsharded computations still run on device 0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
  """Two workers on two cores: one intra-op thread each keeps torch from oversubscribing."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  torch.set_num_threads(1)
