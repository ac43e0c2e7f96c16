"""One TPU chip as a topology: libtpu takes "v5e:1x1", "v6e:1x1" and "v5p:1x1x1" only with a
host of one chip (`aot.host_bounds`), the sizes a single-chip inference fit is compiled for."""

import ml_collections
import pytest

from unires_jax.train import aot

MESH = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


@pytest.mark.parametrize("topology,kind", [("v5e:1x1", "TPU v5 lite"), ("v6e:1x1", "TPU v6 lite"),
                                           ("v5p:1x1x1", "TPU v5")])
def test_one_chip_topologies_give_a_mesh_of_one_chip(topology, kind):
  mesh = aot.topology_mesh(topology, MESH)
  assert mesh.devices.size == 1 and mesh.devices.flat[0].device_kind == kind
  assert mesh.shape == {"data": 1, "fsdp": 1, "tensor": 1}


def test_host_bounds_only_below_the_default_host():
  assert aot.host_bounds("v6e:1x1") == {"chips_per_host_bounds": [1, 1, 1]}
  assert aot.host_bounds("v6e:2x1") == {"chips_per_host_bounds": [2, 1, 1]}
  assert aot.host_bounds("v5p:1x1x1") == {"chips_per_host_bounds": [1, 1, 1]}
  assert aot.host_bounds("v5p:2x2x1") == {} and aot.host_bounds("v6e:4x4") == {}
  assert aot.host_bounds("v6e") == {}  # no shape: libtpu's own error names it
