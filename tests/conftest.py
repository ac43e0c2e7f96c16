"""Shared test setup."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
  """Two workers on two cores: one intra-op thread each keeps torch from oversubscribing."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  torch.set_num_threads(1)
