"""The tiny train step compiled for a TPU slice on this host (`unires_jax.train.aot`): the real
XLA:TPU compiler over a topology's abstract chips, every mesh axis > 1. Needs libtpu (the test
extra's `jax[tpu]`); nothing executes."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

pytest.importorskip("libtpu")

from unires_jax import utils  # pylint: disable=g-import-not-at-top,wrong-import-position
from unires_jax.config_lib import load_config  # pylint: disable=g-import-not-at-top
from unires_jax.train import aot  # pylint: disable=g-import-not-at-top
from unires_jax.train import compile_profile  # pylint: disable=g-import-not-at-top
from unires_jax.train.state import StateFactory  # pylint: disable=g-import-not-at-top


@pytest.mark.slow
def test_tiny_train_step_compiles_for_a_v5p_slice_with_every_mesh_axis():
  config = load_config("tiny")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  # The test's five TPU compiles (this step, `aot.layerwise_cost`'s four) take 30-45 CPU-s each;
  # one mask-decoder layer instead of three saves about a sixth of each. The decoder is no stack
  # that `layerwise_cost` adds up (its layers are in every compile), so nothing checked is lost.
  config.model.mask_decoder.num_layers = 1
  mesh = aot.topology_mesh("v5p:2x2x2", config.mesh)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.devices.flat[0].platform == "tpu"
  factory = StateFactory(config, mesh)
  compiled = aot.compile_train_step(config, mesh, 8, factory)

  # The state is donated: the compiled program writes the new state into the old one's buffers.
  # (Per-chip bytes say little about the sharding at these widths: TPU tiles pad every small
  # array to (8, 128); the compiled input shardings below show it.)
  memory = compiled.memory
  assert 0 < memory["aliased"] <= memory["arguments"]
  assert memory["total"] < aot.HBM_GIB["v5p"] * 2**30
  cost = compiled.cost
  assert cost["flops"] > 0 and cost["seconds"] > 0

  # The compiled program takes the parameters as the rules shard them.
  state_in, _ = compiled.executable.input_shardings[0]
  params = {utils.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(
      state_in.params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  kernel = params["llm/model/layers/0/mlp/up_proj/kernel"]
  kernel = getattr(kernel, "value", kernel)
  assert kernel.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

  # This unrolled step's own cost analysis counts every layer; adding up one layer of each stack
  # at a time (`aot.layerwise_cost`, how a scanned step's cost is counted, its own analysis
  # counting each loop body once) gives the same FLOPs, exactly, and the same cost-model time to
  # within how XLA schedules each program: since RoI pooling became matrix products (42310ba)
  # the sum is 106.08 us against the step's 106.23 (1.4e-3 apart; before, within 1e-3; both with
  # three mask-decoder layers).
  counted = aot.layerwise_cost(config, mesh, 8)
  assert counted.compiles == 4  # one layer each; + a LLaMA layer, a CLIP layer, a ConvNeXt block
  assert counted.flops == cost["flops"]
  assert counted.seconds == pytest.approx(cost["seconds"], rel=2e-3)


def test_scope_of_an_op_name():
  assert compile_profile.scope_of(
      "jit(step)/transpose(jvp(mask_decoder))/while/body/dot_general") == "mask_decoder"
  assert compile_profile.scope_of("jit(step)/optimizer/add") == "optimizer"
  assert compile_profile.scope_of("jit(step)/jvp(llm)/jit(cumsum)/reduce_sum") == "llm"
  assert compile_profile.scope_of("jit(step)/jvp(vmap(jit(cumsum)))/reduce_window_sum") == (
      compile_profile.NO_SCOPE)  # a jitted function's name is not a scope
  assert compile_profile.scope_of("jit(step)/jvp()/select_n") == compile_profile.NO_SCOPE
  assert compile_profile.scope_of("batch['image_high']") == compile_profile.INPUTS
  assert compile_profile.scope_of("") == compile_profile.NO_METADATA


def test_a_profile_without_tpu_emission_events_is_named(tmp_path):
  jax.profiler.start_trace(str(tmp_path))
  jax.jit(lambda x: x + 1).lower(1.0).compile()  # the CPU backend records no such events
  jax.profiler.stop_trace()
  with pytest.raises(ValueError, match="has no 'XLA::TPU emitting for <instruction>' events"):
    compile_profile.by_scope(str(tmp_path), "")
  with pytest.raises(FileNotFoundError, match="no profile"):
    compile_profile.by_scope(str(tmp_path / "empty"), "")


def test_unknown_generation_is_named():
  with pytest.raises(ValueError, match=r"topology 'v9x:2x2': unknown TPU generation 'v9x'"):
    aot.generation("v9x:2x2")


def test_llm_modes_for_the_lora_comparison_and_the_slice_estimate():
  """`benchmarks/tpu_compile.py --compare=lora`: the three ways the LLM trains, and the
  smallest slice a per-chip total scales to."""
  from unires_jax.train import flops  # pylint: disable=g-import-not-at-top
  config = load_config("configs/unires_pp_7b.py:llm_layers=2")
  frozen, lora, full = (aot.llm_mode(config, mode) for mode in aot.LLM_MODES)
  assert dict(frozen.optimizer.lr_multipliers) == {"vision": 0.0, "convnext": 0.0, "llm": 0.0}
  assert (frozen.model.llm.lora.rank, lora.model.llm.lora.rank, full.model.llm.lora.rank) == (
      0, aot.LISA_RANK, 0)
  assert dict(full.optimizer.lr_multipliers) == {"vision": 0.0, "convnext": 0.0}
  train = [flops.count_flops(c, 2, 800).train for c in (frozen, lora, full)]
  assert train[0] == train[1] < train[2]  # LoRA's adapters are not counted, the base is frozen
  with pytest.raises(ValueError, match="unknown LLM mode 'half'"):
    aot.llm_mode(config, "half")

  gib = 2**30
  # 40 GiB per chip on 4 chips: 160 GiB in all -> 2 v5p chips' worth (4 is the smallest slice),
  # 6 v6e chips' worth (8 is the first slice that holds it).
  assert aot.smallest_slice(40 * gib, 4, 128, "v5p") == "v5p:2x2x1 (4 chips)"
  assert aot.smallest_slice(40 * gib, 4, 128, "v6e") == "v6e:2x4 (8 chips)"
  assert aot.smallest_slice(40 * gib, 4, 4, "v6e") == "none up to v6e:16x16"  # batch too small


def test_switches_flipped_for_the_comparison():
  """`benchmarks/tpu_compile.py --compare=remat|scan_layers|effort`: the second row's config,
  each way from each side; nothing else changes."""
  config = load_config("tiny")
  assert (config.model.remat, config.model.scan_layers) == ("none", False)
  remat = aot.flipped(config, "remat")
  assert remat.model.remat == "full" and config.model.remat == "none"  # a copy
  assert aot.flipped(remat, "remat").model.remat == "none"
  config.model.remat = "dots"
  assert aot.flipped(config, "remat").model.remat == "none"
  scanned = aot.flipped(config, "scan_layers")
  assert scanned.model.scan_layers and not aot.flipped(scanned, "scan_layers").model.scan_layers
  low = aot.flipped(config, "effort")
  assert (config.train.exec_time_optimization_effort,
          low.train.exec_time_optimization_effort) == (0.0, -1.0)
  assert aot.flipped(low, "effort").train.exec_time_optimization_effort == 0.0
  config.train.exec_time_optimization_effort = 0.5
  assert aot.flipped(config, "effort").train.exec_time_optimization_effort == -1.0
  for switch, field in (("remat", "remat"), ("scan_layers", "scan_layers")):
    other = aot.flipped(config, switch).to_dict()
    assert other["model"].pop(field) != config.model[field]
    mine = config.to_dict()
    mine["model"].pop(field)
    assert other == mine, switch
  with pytest.raises(ValueError, match="unknown switch 'lora'"):
    aot.flipped(config, "lora")


@pytest.mark.slow
def test_the_benchmark_profiles_the_compile_and_breaks_down_the_peak(tmp_path):
  """`benchmarks/tpu_compile.py --profile_compile=DIR --dump_dir=DIR` (no --topology: the
  config's, `config.topology`): the compile's code
  generation and the memory live at the step's peak, each by named scope, on a small tiny (one
  layer per stack: every scope is there).
  With `--compare=effort`: the step compiled again at XLA's run-time effort -1
  (`config.train.exec_time_optimization_effort`), another program."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from tests.repo import ROOT  # pylint: disable=g-import-not-at-top

  run = subprocess.run(
      [sys.executable, "benchmarks/tpu_compile.py", "--batch=8",  # the config's topology
       "--steps=train", "--config.model.llm.num_layers=1",
       "--config.model.mask_decoder.num_layers=1", "--config.model.vision.num_layers=2",
       "--config.model.convnext.depths=(1,1,1,1)", f"--profile_compile={tmp_path / 'profile'}",
       f"--dump_dir={tmp_path / 'dump'}", "--compare=effort"],
      cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  out = run.stdout
  assert out.startswith("tiny.py on v5p:2x2x1 (4 chips"), out[:300]  # configs/tiny.py's slice
  generation = out[out.index("backend code generation by named scope"):
                   out.index("live at the memory peak")]
  peak = out[out.index("live at the memory peak"):out.index("  step train")]
  # Every part of the model and the step shows (an instruction is counted only with work in
  # it), and the work is part of the compile's time (summed over the compiler's two threads).
  for scope in ("vision", "convnext", "regions", "llm", "mask_decoder", "no_target_head",
                "losses", "optimizer"):
    assert re.search(rf"^    {scope} +[0-9.]+ s +[0-9.]+% +[1-9]\d* instructions$",
                     generation, re.MULTILINE), (scope, generation)
  work = float(re.search(r"\(([0-9.]+) s of work", generation).group(1))
  compile_s = float(re.search(r"train step compiled in ([0-9.]+) s", out).group(1))
  assert 0 < work < 2 * compile_s, (work, compile_s)
  shares = [float(x) for x in re.findall(r" ([0-9.]+)%$", peak, re.MULTILINE)]
  assert len(shares) >= 3 and sum(shares) == pytest.approx(100, abs=0.5), peak
  assert "(inputs: parameters, batch)" in peak, peak  # the state is live at every point
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))

  # The effort reaches the compiler: the same step at -1 is another program (memory per chip:
  # temp, total). Printed in the table as "train effort 0" and "train effort -1".
  assert re.search(r"XLA run-time effort 0$", out, re.MULTILINE), out[:1000]  # the header
  table = {line.split()[2]: line.split()[3:] for line in out.splitlines()
           if re.match(r"train effort -?[01] ", line.strip())}
  assert set(table) == {"0", "-1"}, out[-3000:]
  memory = {e: (cells[3], cells[4]) for e, cells in table.items()}  # temp GiB, total GiB
  assert memory["0"] != memory["-1"], table
  assert list((tmp_path / "dump").glob("*jit_step*after_optimizations-live-range.txt"))


def test_a_sparsecore_offload_is_taken_out_of_the_cost_models_time():
  """XLA:TPU runs a scatter-add on the v5p's SparseCore and its cost model answers -2 s for it
  (aot.SPARSECORE_OFFLOAD_SECONDS); `Compiled.cost` takes that out."""
  mesh = aot.topology_mesh("v5p:2x2x1", ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  table, index = ((jax.ShapeDtypeStruct(shape, jnp.int32, sharding=whole))
                  for shape in ((8, 16), (8, 106)))
  compiled = aot.Compiled("scatter", 0.0, jax.jit(
      lambda t, i, u: t.at[jnp.arange(8)[:, None], i].add(u)).trace(table, index, index)
      .lower().compile())
  raw = compiled.executable.cost_analysis()["optimal_seconds"]
  assert raw == pytest.approx(aot.SPARSECORE_OFFLOAD_SECONDS, abs=1e-3)
  cost = compiled.cost
  assert cost["sparsecore_offloads"] == 1
  assert 0 < cost["seconds"] < 1e-3 and cost["seconds"] == pytest.approx(
      raw - aot.SPARSECORE_OFFLOAD_SECONDS)


def test_the_cost_models_mfu_only_where_its_count_stands():
  peak = aot.PEAK_TFLOPS["v5p"]
  assert aot.cost_model_mfu(459e12, 459e12, 2.0, peak) == pytest.approx(0.5)
  assert aot.cost_model_mfu(459e12, 1.001 * 459e12, 1.0, peak) == pytest.approx(1.0)
  assert aot.cost_model_mfu(459e12, 459e12, -7.9, peak) is None  # an invalid time
  # XLA counting a loop's body once (184.9 of 248.5 TFLOP on v5p:2x2x4): no MFU.
  assert aot.cost_model_mfu(248.5e12, 184.9e12, 0.6, peak) is None
