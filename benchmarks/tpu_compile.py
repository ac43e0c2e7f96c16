r"""The train and predict steps compiled for a TPU slice on this host (deviceless, no TPU needed).

  pip install -e '.[test]'     # the test extra brings jax[tpu] (libtpu)
  python benchmarks/tpu_compile.py --topology=v5p:2x2x1 --mesh=data=1,fsdp=4,tensor=1
  python benchmarks/tpu_compile.py --config=configs/unires_pp_7b.py --steps=train
      # the 7B recipe as configured: bf16, fsdp over every chip, scanned, on its slice
  python benchmarks/tpu_compile.py --config=configs/unires_pp_7b.py:slice=v6e-16 --steps=train
      # another slice's recipe (configs/unires_pp_7b.py SLICES; docs/tpu.md)
  python benchmarks/tpu_compile.py ... --config.model.remat=full   # any config field
  python benchmarks/tpu_compile.py --config=configs/unires_pp_7b.py --topology=v5e:1x1 \
      --steps=predict --batch=8 --config.model.param_dtype=bfloat16 \
      --config.model.quantize.weights=int8   # inference on one chip: docs/tpu.md

Prints, per chip: the memory of the arguments (parameters, optimizer state, batch), outputs,
temporaries and their total against the chip's HBM; XLA's FLOPs beside the analytic count
(`unires_jax.train.flops`, the step's share of one chip); the compile time; and the step time of
the compiler's cost model (a roofline estimate, not a measurement) with the MFU it implies
(analytic FLOPs / estimated time / the chip's dense bf16 peak). XLA's cost analysis counts a
loop's body once, so for scanned layers those come from `aot.layerwise_cost` (small unrolled
compiles added up layer by layer, `--layerwise_cost`). Then the analytic FLOPs per module.
`--compare=remat`, `--compare=scan_layers` or `--compare=effort` compiles the train step once
more with that switch flipped (`aot.flipped`: "none" vs the config's remat, "full" if that is
"none"; scanned vs unrolled; `config.train.exec_time_optimization_effort` -1 vs the config's,
0 if that is -1) and prints both rows.
`--profile_compile=DIR` profiles the first train step's compile there and prints the
backend's code-generation seconds by the model's named scopes (what makes a compile slow);
`--dump_dir=DIR` has XLA dump the compiled steps there and prints what is live at the first
one's memory peak by named scope (what fills the temp memory).
`--compare=lora` compiles it three ways, the LLM frozen, trained with LoRA (the
config's `model.llm.lora`, rank 8 if it is off) and fully fine-tuned, the other multipliers as
the config has them (`aot.llm_mode`), and estimates for each the smallest v5p and v6e slice
it fits (`aot.smallest_slice`).

Nothing executes: `unires_jax.train.aot` lowers the steps with ShapeDtypeStructs over the
topology's abstract chips and runs the real XLA:TPU compiler.
"""

import os
import sys
import time
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from unires_jax import config_lib, parallel
from unires_jax.parallel import mesh as mesh_lib
from unires_jax.data import preprocess
from unires_jax.models import quantize
from unires_jax.train import aot
from unires_jax.train import compile_profile
from unires_jax.train import flops as flops_lib
from unires_jax.train.state import StateFactory
from unires_jax.train.step import exec_time_effort

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_lib.resolve("configs/tiny.py"),
    "Config file; override fields with --config.x=y.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology, e.g. v5p:4x4x4, v6e:4x4, v5e:4x4, v4:2x2x2 (default: "
    "config.topology, the slice of the config's recipe; v5p:2x2x1 for a config without one).")
_MESH = flags.DEFINE_string(
    "mesh", None, "Mesh sizes as data=..,fsdp=..,tensor=.. (one may be -1); default config.mesh.")
_BATCH = flags.DEFINE_integer(
    "batch", None, "Global batch size (default: config.input.global_batch_size).")
_STEPS = flags.DEFINE_list("steps", ["train", "predict"], "Which steps to compile.")
_LAYERWISE = flags.DEFINE_bool(
    "layerwise_cost", None,
    "For a scanned config, count the train step's FLOPs and cost-model time layer by layer "
    "(aot.layerwise_cost: a few more compiles of small unrolled variants); XLA's cost analysis "
    "counts a loop body once. Default: for the first train step compiled (not the other "
    "rows of --compare), when it is scanned.")
_PROFILE = flags.DEFINE_string(
    "profile_compile", None,
    "Profile the first train step's compile with jax.profiler into this folder (TensorBoard / "
    "xprof can open it) and print the backend's code-generation seconds by the model's named "
    "scopes (unires_jax.train.compile_profile).")
_DUMP = flags.DEFINE_string(
    "dump_dir", None,
    "Have XLA dump the compiled train steps into this folder (XLA_FLAGS --xla_dump_to) and "
    "print what is live at the first one's memory peak, by the model's named scopes "
    "(unires_jax.train.compile_profile.peak_memory_by_scope). The dump of a 7B step is large.")
_COMPARE = flags.DEFINE_enum(
    "compare", None, [*aot.SWITCHES, "lora"],
    "Also compile the train step with this switch flipped and print both rows.")

GIB = 2**30


def parse_mesh(text: str) -> dict[str, int]:
  """"data=1,fsdp=-1,tensor=2" -> {"data": 1, "fsdp": -1, "tensor": 2}."""
  out = {}
  for item in text.split(","):
    name, sep, size = item.partition("=")
    if not sep:
      raise app.UsageError(f"--mesh: {item!r} is not axis=size")
    out[name.strip()] = int(size)
  return out


def row(label: str, compiled: aot.Compiled, analytic: float | None, chips: int, peak: float,
        scanned: bool, layerwise: aot.LayerwiseCost | None = None) -> dict[str, str]:
  """One table row: memory per chip in GiB, FLOPs, compile time, the cost model's estimate.

  A scanned step's own XLA FLOPs and cost-model time count each loop body once; its row shows
  `layerwise` instead when given (marked "lw"), "loop" otherwise."""
  mem = compiled.memory
  flops, estimate, mark = compiled.cost["flops"], compiled.cost["seconds"], ""
  if layerwise is not None:
    flops, estimate, mark = layerwise.flops, layerwise.seconds, " lw"
  counted = layerwise is not None or not scanned
  mfu = "n/a"
  if analytic is not None and counted:
    value = aot.cost_model_mfu(analytic / chips, flops, estimate, peak)
    if value is not None:
      mfu = f"{value:.1%}{mark}"
    elif estimate > 0:
      mfu = "n/a (loops)"  # XLA's FLOPs short of the analytic count (aot.cost_model_mfu)
  return {
      "step": label,
      "args GiB": f"{mem['arguments'] / GIB:.2f}",
      "out GiB": f"{mem['outputs'] / GIB:.2f}",
      "aliased": f"{mem['aliased'] / GIB:.2f}",
      "temp GiB": f"{mem['temp'] / GIB:.2f}",
      "total GiB": f"{mem['total'] / GIB:.2f}",
      "XLA TFLOP": f"{flops / 1e12:.4g}{mark}" if counted else "loop",
      "analytic TFLOP": "n/a" if analytic is None else f"{analytic / chips / 1e12:.4g}",
      "compile s": f"{compiled.seconds:.1f}",
      # A time the cost model still answers negative after aot's SparseCore correction is
      # shown as such, with no MFU.
      "est. step ms": (f"{estimate * 1e3:.1f}{mark}" + ("" if estimate > 0 else " (invalid)")
                       if counted else "loop"),
      "est. MFU": mfu if counted else "loop",
  }


def print_rows(rows: list[dict[str, str]]) -> None:
  widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
  print("  ".join(k.rjust(w) for k, w in widths.items()))
  for r in rows:
    print("  ".join(r[k].rjust(widths[k]) for k in widths))


def print_scope_times(times: list[compile_profile.ScopeTime]) -> None:
  """The compile's code-generation work by named scope (`compile_profile.by_scope`)."""
  total = sum(t.seconds for t in times)
  print(f"  backend code generation by named scope ({total:.1f} s of work, per-instruction "
        "passes summed over the compiler's threads):")
  for t in times:
    print(f"    {t.scope:<52}{t.seconds:>9.1f} s{t.seconds / total:>7.1%}"
          f"{t.instructions:>7d} instructions", flush=True)


def print_peak(peak: list[tuple[str, int]]) -> None:
  """What is live at the compiled step's memory peak, by named scope."""
  total = sum(b for _, b in peak)
  unit, scale = ("GiB", GIB) if total >= GIB else ("MiB", 2**20)
  print(f"  live at the memory peak by named scope ({total / scale:.2f} {unit} per chip):")
  for scope, size in peak:
    print(f"    {scope:<52}{size / scale:>9.2f} {unit}{size / total:>7.1%}", flush=True)


def describe(config, switch: str | None) -> str:
  if switch == "remat":
    return f"remat={config.model.remat}"
  if switch == "scan_layers":
    return "scanned" if config.model.get("scan_layers", False) else "unrolled"
  if switch == "effort":
    return f"effort {exec_time_effort(config):g}"
  if switch == "lora":
    lora = config.model.llm.lora
    if lora.rank:
      return f"LoRA r={lora.rank} {'+'.join(t.split('_')[0] for t in lora.targets)}"
    return "frozen LLM" if "llm" in config.optimizer.lr_multipliers else "full LLM"
  return ""


def _weights(config) -> str:
  """How the predict step holds its weights: the param dtype, or the quantized type (the rest
  in the param dtype)."""
  quantized = quantize.weights(config.model)
  return (config.model.param_dtype if quantized == "none"
          else f"{quantized}+{config.model.param_dtype}")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _DUMP.value:  # read when the backends start, which has not happened yet
    os.environ["XLA_FLAGS"] = " ".join(filter(None, (
        os.environ.get("XLA_FLAGS"), f"--xla_dump_to={_DUMP.value}",
        "--xla_dump_hlo_module_re=jit_step")))
  if _MESH.value:
    config.mesh.update(parse_mesh(_MESH.value))
  unknown = set(_STEPS.value) - {"train", "predict"}
  if unknown:
    raise app.UsageError(f"--steps: unknown {sorted(unknown)}; choose from train, predict")
  batch = _BATCH.value or config.input.global_batch_size
  topology = _TOPOLOGY.value or config.get("topology") or "v5p:2x2x1"
  gen = aot.generation(topology)
  hbm, peak = aot.HBM_GIB[gen], aot.PEAK_TFLOPS[gen]
  mesh = aot.topology_mesh(topology, config.mesh)
  chips = mesh.size
  seq_len = preprocess.sample_spec(config.model, config.input).max_length
  name = os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  print(f"{name} on {topology} ({chips} chips, {mesh.devices.flat[0].device_kind}, "
        f"{hbm:g} GiB HBM, {peak:g} TFLOP/s bf16 each), mesh {dict(mesh.shape)}, "
        f"global batch {batch}, sequence {seq_len}, compute {config.model.dtype}, "
        f"remat {config.model.remat}, scan_layers {config.model.get('scan_layers', False)}, "
        f"XLA run-time effort {exec_time_effort(config):g}")
  if overrides:
    print("overrides: " + " ".join(overrides))
  if batch % mesh_lib.batch_rows(mesh):
    raise app.UsageError(f"--batch={batch} does not divide over the mesh's "
                         f"{mesh_lib.batch_rows(mesh)} batch rows (data x fsdp)")

  count = flops_lib.count_flops(config, batch, seq_len)
  rows = []
  if _COMPARE.value == "lora":
    configs = [aot.llm_mode(config, mode) for mode in aot.LLM_MODES]
  else:
    configs = [config] + ([aot.flipped(config, _COMPARE.value)] if _COMPARE.value else [])
  for i, cfg in enumerate(configs):
    start = time.perf_counter()
    # The predict step alone needs no optimizer: a quantized model (config.model.quantize),
    # which has none, compiles it too.
    factory = StateFactory(cfg, mesh) if "train" in _STEPS.value else None
    model = factory.model if factory else parallel.ShardedModel(cfg, mesh)
    build_s = time.perf_counter() - start
    label = describe(cfg, _COMPARE.value)
    print(f"abstract model{' and state' if factory else ''}{f' ({label})' if label else ''}: "
          f"{build_s:.1f} s", flush=True)
    if "train" in _STEPS.value:
      profile_dir = _PROFILE.value if i == 0 else None
      compiled = aot.compile_train_step(cfg, mesh, batch, factory, profile_dir=profile_dir)
      print(f"  train step compiled in {compiled.seconds:.1f} s", flush=True)
      if profile_dir:
        print_scope_times(compile_profile.by_scope(profile_dir, compiled.executable.as_text()))
      if _DUMP.value and i == 0:
        print_peak(compile_profile.peak_memory_by_scope(_DUMP.value))
      scanned = bool(cfg.model.get("scan_layers", False))
      layerwise = None
      if scanned and (_LAYERWISE.value or (_LAYERWISE.value is None and i == 0)):
        layerwise = aot.layerwise_cost(cfg, mesh, batch, log=lambda m: print(m, flush=True))
        print(f"  layerwise cost: {layerwise.compiles} compiles, "
              f"{layerwise.compile_seconds:.1f} s", flush=True)
      analytic = flops_lib.count_flops(cfg, batch, seq_len).train  # what trains differs
      rows.append(row(f"train {label}".strip(), compiled, analytic, chips, peak, scanned,
                      layerwise))
      print("  " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)  # kept if
      # a long run (several 7B compiles) is stopped before the table
    if "predict" in _STEPS.value and i == 0:
      compiled = aot.compile_predict_step(cfg, mesh, batch, model)
      rows.append(row(f"predict {_weights(cfg)}", compiled, count.forward, chips, peak,
                      bool(cfg.model.get("scan_layers", False))))
      print(f"  predict step compiled in {compiled.seconds:.1f} s", flush=True)
  print()
  print_rows(rows)
  worst = max(float(r["total GiB"]) for r in rows)
  print(f"\nlargest total per chip: {worst:.2f} GiB of {hbm:g} GiB HBM "
        f"({'fits' if worst <= hbm else 'does NOT fit'})")
  if _COMPARE.value == "lora":
    print(f"\n{'train step':<28}{'smallest v5p slice (est.)':>30}{'smallest v6e slice (est.)':>30}")
    for r in rows:
      if r["step"].startswith("train"):
        total = float(r["total GiB"]) * GIB
        print(f"{r['step']:<28}" + "".join(
            f"{aot.smallest_slice(total, chips, batch, g):>30}" for g in ("v5p", "v6e")))
    print("(est.: this compile's per-chip total x its chips / the slice's chips; compile on "
          "the slice itself to confirm)")
  print("memory and XLA FLOPs are per chip, from the compiled program; analytic = "
        "unires_jax/train/flops.py / chips (the predict row: the forward count, LM head at the "
        "answer); est. step and MFU come from the compiler's cost model (optimal_seconds), an "
        "estimate, not a measurement. A scanned step's own cost counts each loop body once "
        "(\"loop\"); \"lw\": counted layer by layer from unrolled compiles "
        "(aot.layerwise_cost)")
  print(f"\n{'module':<18}{'fwd TFLOP':>12}{'train TFLOP':>13}{'share':>8}   (whole batch)")
  for module, (forward, train) in count.by_module().items():
    print(f"{module:<18}{forward / 1e12:>12.4g}{train / 1e12:>13.4g}"
          f"{train / count.train:>8.1%}")


if __name__ == "__main__":
  app.run(main)
