"""The train and predict steps compiled ahead of time for a TPU slice this host does not have.

With libtpu installed (`pip install "jax[tpu]"`, the test extra), the abstract devices of a
topology (`jax.experimental.topologies`, e.g. "v5p:4x4x4") take a mesh like real ones, and
`jit(...).lower(<ShapeDtypeStructs with shardings>).compile()` runs the real XLA:TPU and Mosaic
compilers on any host; nothing executes. What the compiler reports is per chip: the memory of
the arguments, outputs and temporaries (`memory_analysis`), the FLOPs, and its cost model's
roofline step time (`cost_analysis()["optimal_seconds"]`), an estimate, not a measurement.
"""

import dataclasses
import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from unires_jax import parallel
from unires_jax.data import preprocess
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.models.unires import INPUT_KEYS
from unires_jax.train import flops as flops_lib
from unires_jax.train.state import StateFactory
from unires_jax.train.step import MODEL_KEYS, exec_time_effort, make_train_step, model_fields

# Per chip, by generation (the topology name's prefix): HBM in GiB as the compiler counts it
# (v5p: 95.74 GiB), and the dense bfloat16 peak in TFLOP/s.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.74, "v6e": 31.25}
PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
# How the LLM trains, for comparing train steps (`llm_mode`, benchmarks/tpu_compile.py).
LLM_MODES = ("frozen LLM", "LoRA", "full LLM")
LISA_RANK = 8  # --compare=lora's rank when the config's LoRA is off
# The switches `flipped` flips (benchmarks/tpu_compile.py --compare).
SWITCHES = ("remat", "scan_layers", "effort")
# XLA:TPU offloads some scatters to the chip's SparseCores (seen on v5p: the token splice's
# scatter-adds at 4 rows per chip and more, none at 2), each as an asynchronous call opened by
# this custom call, and its cost model answers SPARSECORE_OFFLOAD_SECONDS for each: a lone
# scatter-add on v5p:2x2x1 costs -2.0000 s with one offload, the tiny step -6.0 s with three and
# -8.0 s with four (tests/train/test_tpu_compile.py). `Compiled.cost` takes them out; what the
# SparseCore does, beside the TensorCore's work, is not counted.
SPARSECORE_OFFLOAD = 'custom_call_target="PrepareAsyncCallStart"'
SPARSECORE_OFFLOAD_SECONDS = -2.0
SHORT_FLOPS = 0.99  # `cost_model_mfu`: XLA's FLOPs below this share of the analytic count
# Slices by chip count: v5p (3-D tori) and v6e (2-D), as `--topology` names them.
SLICES = {
    "v5p": ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"), (64, "4x4x4"),
            (128, "4x4x8"), (256, "4x8x8"), (512, "8x8x8")),
    "v6e": ((1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"),
            (128, "8x16"), (256, "16x16")),
}


def generation(topology: str) -> str:
  """"v5p:4x4x4" -> "v5p"; an unknown generation is named with the known ones."""
  name = topology.split(":")[0]
  if name not in HBM_GIB:
    raise ValueError(f"topology {topology!r}: unknown TPU generation {name!r}; "
                     f"known: {sorted(HBM_GIB)}")
  return name


def host_bounds(topology: str) -> dict[str, list[int]]:
  """libtpu's keyword for a slice smaller than its default host of 2x2x1 chips along x or y.

  libtpu refuses "v6e:1x1" or "v5p:1x1x1" ("not divisible by ... chips_per_host_bounds
  2x2x1") unless the host is that small too: one chip, `{"chips_per_host_bounds": [1, 1, 1]}`.
  Larger slices keep the default (`{}`).
  """
  try:
    dims = [int(d) for d in topology.split(":", 1)[1].split("x")]
  except (IndexError, ValueError):
    return {}  # not "<generation>:<x>x<y>[x<z>]": libtpu names the problem
  if len(dims) < 2 or (dims[0] >= 2 and dims[1] >= 2):
    return {}
  return {"chips_per_host_bounds": [min(dims[0], 2), min(dims[1], 2), 1]}


def topology_mesh(topology: str, mesh_cfg: ml_collections.ConfigDict) -> Mesh:
  """A mesh of `config.mesh`'s axes over the abstract chips of `topology` ("v5p:2x2x2"; one
  chip: "v5e:1x1", "v6e:1x1", "v5p:1x1x1")."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  generation(topology)
  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                           **host_bounds(topology)).devices
  except Exception as e:  # libtpu missing or the name refused: say which
    raise ValueError(f"cannot build TPU topology {topology!r} on this host ({e}); deviceless "
                     "compilation needs libtpu: pip install 'jax[tpu]'") from e
  return parallel.make_mesh(mesh_cfg, devices=devices)


def llm_mode(config: ml_collections.ConfigDict, mode: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose LLM trains as `mode` (one of LLM_MODES) says: "frozen LLM" adds
  lr_multipliers "llm": 0.0, "full LLM" drops every "llm..." multiplier, both with LoRA off;
  "LoRA" keeps the config's LoRA (rank LISA_RANK when off)."""
  if mode not in LLM_MODES:
    raise ValueError(f"unknown LLM mode {mode!r}; known: {LLM_MODES}")
  other = config.copy_and_resolve_references()
  multipliers = {k: v for k, v in other.optimizer.lr_multipliers.items()
                 if k.strip("/").split("/")[0] != "llm"}
  if mode == "frozen LLM":
    multipliers["llm"] = 0.0
  other.optimizer.lr_multipliers = ml_collections.ConfigDict(multipliers)
  lora = other.model.llm.lora
  lora.rank = (lora.rank or LISA_RANK) if mode == "LoRA" else 0
  return other


def flipped(config: ml_collections.ConfigDict, switch: str) -> ml_collections.ConfigDict:
  """A copy of `config` with `switch` (one of SWITCHES) flipped: "remat" "none" <-> the
  config's ("full" if that is "none"); "scan_layers" scanned <-> unrolled; "effort" the
  compiler's run-time effort -1 <-> the config's (0 if that is -1)."""
  if switch not in SWITCHES:
    raise ValueError(f"unknown switch {switch!r}; known: {SWITCHES}")
  other = config.copy_and_resolve_references()
  if switch == "remat":
    other.model.remat = "full" if config.model.remat == "none" else "none"
  elif switch == "scan_layers":
    other.model.scan_layers = not config.model.get("scan_layers", False)
  else:
    other.train.exec_time_optimization_effort = 0.0 if exec_time_effort(config) == -1 else -1.0
  return other


def smallest_slice(total_bytes: float, chips: int, batch: int, gen: str) -> str:
  """The smallest slice of generation `gen` whose chips would hold the step: an estimate that
  scales the per-chip total of a compile on `chips` chips by chips / slice chips (parameters,
  optimizer state and activations all sharded over every chip, as `fsdp=-1` does, at the same
  global batch, which each slice's chips must divide)."""
  for size, name in SLICES[gen]:
    if batch % size == 0 and total_bytes * chips / size <= HBM_GIB[gen] * 2**30:
      return f"{gen}:{name} ({size} chips)"
  return f"none up to {gen}:{SLICES[gen][-1][1]}"


def synthetic_batch_at_pipeline_length(config: ml_collections.ConfigDict,
                                       batch_size: int) -> dict[str, np.ndarray]:
  """A synthetic training batch (`MODEL_KEYS`) whose sequences are as long as the input
  pipeline's (`preprocess.sample_spec(...).max_length`; the prompt fills the rest), so that
  compiled and benchmarked steps have the training run's shapes."""
  length = preprocess.sample_spec(config.model, config.input).max_length
  probe = synthetic_batch(config.model, 1, prompt_length=1)["input_ids"].shape[1]
  return model_fields(synthetic_batch(config.model, batch_size, no_target_every=4,
                                      prompt_length=1 + length - probe))


def batch_spec(config: ml_collections.ConfigDict, batch_size: int, mesh: Mesh,
               keys: tuple[str, ...]) -> dict[str, jax.ShapeDtypeStruct]:
  """The fields `keys` of `synthetic_batch_at_pipeline_length` as ShapeDtypeStructs of
  `batch_size` rows, sharded over the mesh's batch axes."""
  one = synthetic_batch_at_pipeline_length(config, 1)
  rows = parallel.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(one[k])[1:]), one[k].dtype,
                                  sharding=rows) for k in keys}


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One compiled step and what the compiler reports, per chip."""

  name: str
  seconds: float  # tracing, lowering and compilation
  executable: Any  # jax.stages.Compiled

  @property
  def memory(self) -> dict[str, int]:
    """Bytes per chip: arguments, outputs, aliased (donated inputs reused as outputs), temp,
    code, and the total live at the peak (arguments + outputs - aliased + temp + code)."""
    m = self.executable.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
                    + out["code"])
    return out

  @functools.cached_property
  def cost(self) -> dict[str, float]:
    """XLA's FLOPs of one chip's program, the cost model's step time in seconds (each
    SparseCore offload's sentinel taken out: `SPARSECORE_OFFLOAD_SECONDS`) and the number of
    those offloads."""
    c = self.executable.cost_analysis() or {}
    offloads = self.executable.as_text().count(SPARSECORE_OFFLOAD)
    seconds = float(c.get("optimal_seconds", 0.0)) - offloads * SPARSECORE_OFFLOAD_SECONDS
    return {"flops": float(c.get("flops", 0.0)), "seconds": seconds,
            "sparsecore_offloads": offloads}


def _compile(name: str, lower, profile_dir: str | None = None) -> Compiled:
  start = time.perf_counter()
  lowered = lower()
  # The profile holds the compile alone, without the Python tracer: tracing and lowering are
  # millions of Python calls, each recorded (the tiny step's profile: 96 MB instead of 6 MB, and
  # about 15 CPU-s more). Nor the HLO protos, for profiles of programs that run: nothing does
  # here (the tiny step's compile under the profiler: about 16 of 83 CPU-s less).
  if profile_dir:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.enable_hlo_proto = False
    jax.profiler.start_trace(profile_dir, profiler_options=options)
  try:
    executable = lowered.compile()
  finally:
    if profile_dir:
      jax.profiler.stop_trace()
  return Compiled(name, time.perf_counter() - start, executable)


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh, batch_size: int,
                       factory: StateFactory | None = None,
                       profile_dir: str | None = None) -> Compiled:
  """The train step of `config` (`train.step.make_train_step`, state donated) for `mesh`;
  with `profile_dir`, traced by `jax.profiler` there (`compile_profile.by_scope` reads it)."""
  factory = factory or StateFactory(config, mesh)
  batch = batch_spec(config, batch_size, mesh, MODEL_KEYS)
  return _compile("train", lambda: make_train_step(factory).lower(
      factory.abstract_sharded(), batch), profile_dir)


def compile_predict_step(config: ml_collections.ConfigDict, mesh: Mesh, batch_size: int,
                         model: parallel.ShardedModel | None = None) -> Compiled:
  """The prediction function (`parallel.make_predict`: masks and no-target logits) for `mesh`."""
  model = model or parallel.ShardedModel(config, mesh)
  batch = batch_spec(config, batch_size, mesh, INPUT_KEYS)
  return _compile("predict", lambda: parallel.make_predict(model).lower(
      model.abstract_sharded(), batch))


def cost_model_mfu(analytic_flops: float, counted_flops: float, seconds: float,
                   peak_tflops: float) -> float | None:
  """The MFU a cost-model step time implies: analytic FLOPs per chip / `seconds` / the chip's
  peak. None where the estimate cannot stand: a time that is not positive, or XLA's FLOPs
  (`counted_flops`, per chip) below SHORT_FLOPS of the analytic count, where the program has
  loops of XLA's own whose body its cost analysis counts once (the windowed einsums of its
  collective matrix products on the smaller slices: the 7B step on v5p:2x2x4 at batch 128,
  counted layer by layer, has 184.9 of the analytic 248.5 TFLOP per chip), and the time falls
  short with the FLOPs."""
  if seconds <= 0 or counted_flops < SHORT_FLOPS * analytic_flops:
    return None
  return analytic_flops / seconds / (peak_tflops * 1e12)


@dataclasses.dataclass(frozen=True)
class LayerwiseCost:
  """A step's per-chip XLA FLOPs and cost-model step time, its layers added up one by one
  (`layerwise_cost`), and what that took."""

  flops: float
  seconds: float
  compiles: int
  compile_seconds: float


def _with_stacks(config: ml_collections.ConfigDict, llm_layers: int, vision_layers: int,
                 depths: tuple[int, ...]) -> ml_collections.ConfigDict:
  """A copy of `config` with unrolled layers, these LLaMA / CLIP layer counts (every CLIP layer
  run: `select_layer` -1, the same shapes) and these ConvNeXt stage depths."""
  other = config.copy_and_resolve_references()
  other.model.scan_layers = False
  other.model.llm.num_layers = llm_layers
  other.model.vision.update(num_layers=vision_layers, select_layer=-1)
  other.model.convnext.depths = tuple(depths)
  return other


def layerwise_cost(config: ml_collections.ConfigDict, mesh: Mesh, batch_size: int,
                   log=lambda message: None, step: str = "train") -> LayerwiseCost:
  """The train (or, `step="predict"`, the predict) step's XLA FLOPs and cost-model seconds per
  chip, every layer counted.

  XLA's cost analysis counts a while loop's body once, so for scanned layers
  (`config.model.scan_layers`) the compiled step's FLOPs and `optimal_seconds` are those of one
  layer per stack (the 7B step: 4.8 of 62 TFLOP per chip). Here the step is compiled unrolled
  with one layer per stack (one LLaMA layer, one CLIP layer, one block per ConvNeXt stage),
  then once more per kind of stack with a layer added (the ConvNeXt stages of equal depth
  together); each difference is one layer's cost, and the step's cost is the first compile's
  plus, per stack, its further layers times that. The 7B config takes five compiles of small
  programs. Elementwise: exact for a program that is the sum of its layers,
  which a step with the same fusion in every layer of a stack is; the FLOPs beside the analytic
  count (`train.flops`) show how close.
  """
  m = config.model
  depths = tuple(m.convnext.depths)
  ones = (1,) * len(depths)
  base_cfg = _with_stacks(config, 1, 1, ones)
  clip_layers = flops_lib.clip_layers_run(m.vision, bool(m.get("scan_layers", False)))
  added = [(_with_stacks(config, 2, 1, ones), m.llm.num_layers - 1, "LLaMA layer"),
           (_with_stacks(config, 1, 2, ones), clip_layers - 1, "CLIP layer")]
  for depth in sorted(set(depths) - {1}):
    plus = tuple(2 if d == depth else 1 for d in depths)
    added.append((_with_stacks(config, 1, 1, plus), depth - 1,
                  f"ConvNeXt block (stages of depth {depth})"))
  compile_step = {"train": compile_train_step, "predict": compile_predict_step}[step]
  base = compile_step(base_cfg, mesh, batch_size)
  log(f"  layerwise cost: one layer per stack compiled in {base.seconds:.1f} s "
      f"({base.cost['flops'] / 1e12:.4g} TFLOP, {base.cost['seconds'] * 1e3:.2f} ms per chip)")
  flops, seconds, spent = base.cost["flops"], base.cost["seconds"], base.seconds
  for cfg, count, what in added:
    one = compile_step(cfg, mesh, batch_size)
    spent += one.seconds
    log(f"  layerwise cost: + one {what} (x {count}) compiled in {one.seconds:.1f} s "
        f"({one.cost['flops'] / 1e12:.4g} TFLOP, {one.cost['seconds'] * 1e3:.2f} ms per chip)")
    flops += count * (one.cost["flops"] - base.cost["flops"])
    seconds += count * (one.cost["seconds"] - base.cost["seconds"])
  return LayerwiseCost(flops, seconds, 1 + len(added), spent)
