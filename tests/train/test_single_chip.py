"""One TPU chip as a topology: libtpu takes "v5e:1x1", "v6e:1x1" and "v5p:1x1x1" only with a
host of one chip (`aot.host_bounds`), the sizes a single-chip inference fit is compiled for;
`benchmarks/single_chip.py` finds the smallest that holds a predict step."""

import subprocess
import sys

import ml_collections
import pytest

from tests.repo import ROOT
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


@pytest.mark.slow
def test_the_benchmark_finds_the_smallest_chip_and_counts_the_predict_step_layer_by_layer():
  """`benchmarks/single_chip.py` on the tiny model one layer deep, int8: compiled for one v5e
  chip, where it fits, and its cost-model time counted layer by layer (`aot.layerwise_cost` of
  the predict step)."""
  run = subprocess.run(
      [sys.executable, "benchmarks/single_chip.py", "--config=configs/tiny.py", "--weights=int8",
       "--batches=2", "--chips=v5e:1x1,v5p:1x1x1", "--config.model.llm.num_layers=1",
       "--config.model.mask_decoder.num_layers=1", "--config.model.vision.num_layers=2",
       "--config.model.convnext.depths=(1,1,1,1)"],
      cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "int8 batch 2 on v5e:1x1: " in run.stdout  # the progress line, then the table's row
  (row,) = [line.split() for line in run.stdout.splitlines() if line.startswith("int8  ")]
  weights, batch, chip, params, temp, total, hbm, per_call, per_image = row[:9]
  assert (weights, batch, chip, hbm) == ("int8", "2", "v5e", "16")
  assert " ".join(row[9:]) == "v5e: fits"  # the first chip fits: v5p is not compiled
  assert 0 < float(total) < 16 and float(per_call) > 0
  assert float(per_image) == pytest.approx(float(per_call) / 2, abs=0.06)
