r"""Train-step time, examples/s and model FLOPs utilisation (MFU) of UniRES++.

  python benchmarks/train_step.py                        # tiny config, on this machine (CPU)
  python benchmarks/train_step.py --config=configs/unires_pp_7b.py \
      --config.model.llm.num_layers=4 --config.model.dtype=bfloat16 --batch_size=8

The second line is the intended use on one GPU (H100 / H200): the full-width model, every tower
at its released size, with the LLM cut to 4 of its 32 layers so that the parameters, the AdamW
state of the trainable ones and a batch of 8 fit one device. No GPU numbers are claimed here.

What runs: the jitted train step of `unires_jax.train.step.make_train_step` (forward, backward,
AdamW) on the state of `StateFactory(config, mesh).create()` over `make_mesh(config.mesh)` (all
devices), with the parameters `config.optimizer.lr_multipliers` freezes frozen (stage 1: both
vision towers). The batch is `train.aot.synthetic_batch_at_pipeline_length`: synthetic
sequences as long as the input pipeline's, so the shapes are the training run's.

Measured: compile = lowering + XLA compilation of the step; step = wall time of one call that
blocks on its outputs (metrics and the new state), over `--steps` calls after `--warmup`;
examples/s = batch / median step. FLOPs: "analytic" is `unires_jax.train.flops.count_flops`
(matrix products and convolutions, 2 FLOPs per multiply-add, backward by what trains, no remat
recompute); "XLA" is the cost analysis of the same step compiled for one device, which also counts
elementwise work, so ratio = analytic / XLA sits a little below 1 at full width and lower at tiny
widths. MFU = analytic FLOPs / median step / (peak FLOP/s per device x devices); the peak is the
dense bf16 figure of the device (table below) or `--peak_tflops`; the CPU has none.
"""

import os
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unires_jax import config_lib, parallel
from unires_jax.train import aot
from unires_jax.train import flops as flops_lib
from unires_jax.train.state import StateFactory
from unires_jax.train.step import make_train_step

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_lib.resolve("configs/tiny.py"),
    "Config file; override fields with --config.x=y.")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "Global batch size (default: config.input.global_batch_size).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float(
    "peak_tflops", None, "Peak TFLOP/s of one device for MFU (default: the device table).")
_DTYPE = flags.DEFINE_string(
    "dtype", None, "Compute dtype override (config.model.dtype), e.g. bfloat16.")

# Dense bf16 peak TFLOP/s per device, by a substring of `device_kind` (first match wins).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),  # v5p
)


def peak_tflops(device: jax.Device) -> tuple[float | None, str]:
  """(peak TFLOP/s of one device, where it comes from), or (None, why there is none)."""
  if _PEAK.value is not None:
    return _PEAK.value, "--peak_tflops"
  for kind, peak in PEAK_TFLOPS:
    if kind in device.device_kind:
      return peak, f"dense bf16 of {kind}"
  return None, (f"no peak FLOP/s known for {device.platform} '{device.device_kind}'; "
                "pass --peak_tflops")


def abstract_inputs(factory: StateFactory, batch: dict[str, np.ndarray]):
  """(state, batch) as ShapeDtypeStructs with the factory mesh's shardings."""
  rows = parallel.batch_sharding(factory.mesh)
  return factory.abstract_sharded(), {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in batch.items()}


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled computation by XLA's cost analysis (None if the backend gives none)."""
  return (compiled.cost_analysis() or {}).get("flops")


def one_device_flops(config, batch: dict[str, np.ndarray]) -> float | None:
  """XLA's FLOPs of the whole step compiled for one device (a sharded step's cost analysis
  counts one device's share)."""
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  factory = StateFactory(config, mesh)
  return xla_flops(make_train_step(factory).lower(*abstract_inputs(factory, batch)).compile())


def time_steps(compiled, state, batch, warmup: int, steps: int):
  """Seconds of each timed step, and the last step's metrics."""
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times, metrics


def fmt_tflops(value: float | None) -> str:
  return "n/a" if value is None else f"{value / 1e12:.4g}"


def print_table(row: dict[str, str]) -> None:
  widths = {k: max(len(k), len(v)) for k, v in row.items()}
  print("  ".join(k.rjust(w) for k, w in widths.items()))
  print("  ".join(v.rjust(widths[k]) for k, v in row.items()))


def print_modules(count: flops_lib.FlopCount) -> None:
  """Analytic FLOPs per top-level module: forward, train, and their ratio (the backward rule)."""
  print(f"\n{'module':<18}{'fwd TFLOPs':>12}{'train TFLOPs':>14}{'train/fwd':>11}")
  for name, (forward, train) in count.by_module().items():
    print(f"{name:<18}{forward / 1e12:>12.4g}{train / 1e12:>14.4g}{train / forward:>11.2f}")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  batch_size = _BATCH.value or config.input.global_batch_size
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  devices = jax.devices()
  print(f"device: {devices[0].device_kind} ({jax.default_backend()}) x {len(devices)}, "
        f"jax {jax.__version__}, compute {config.model.dtype}, "
        f"lr multipliers {dict(config.optimizer.lr_multipliers) or 'none (all train)'}")
  if overrides:
    print("overrides: " + " ".join(overrides))

  mesh = parallel.make_mesh(config.mesh)
  factory = StateFactory(config, mesh)
  host_batch = aot.synthetic_batch_at_pipeline_length(config, batch_size)
  seq_len = host_batch["input_ids"].shape[1]
  start = time.perf_counter()
  compiled = make_train_step(factory).lower(*abstract_inputs(factory, host_batch)).compile()
  compile_s = time.perf_counter() - start
  xla = xla_flops(compiled) if mesh.size == 1 else one_device_flops(config, host_batch)

  times, metrics = time_steps(compiled, factory.create(), parallel.shard_batch(host_batch, mesh),
                              _WARMUP.value, _STEPS.value)
  step_s = statistics.median(times)
  count = flops_lib.count_flops(config, batch_size, seq_len)
  peak, peak_note = peak_tflops(devices[0])
  if peak is not None and config.model.dtype != "bfloat16":
    peak_note += f"; this run computes in {config.model.dtype}"
  mfu = "n/a" if peak is None else f"{count.train / step_s / (peak * 1e12 * len(devices)):.1%}"
  print_table({
      "config": os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])),
      "devices": str(len(devices)),
      "batch": str(batch_size),
      "seq len": str(seq_len),
      "compile s": f"{compile_s:.1f}",
      "step ms": f"{1e3 * step_s:.1f}",
      "mean ms": f"{1e3 * statistics.mean(times):.1f}",
      "examples/s": f"{batch_size / step_s:.1f}",
      "analytic TFLOPs": fmt_tflops(count.train),
      "XLA TFLOPs": fmt_tflops(xla),
      "ratio": "n/a" if xla is None else f"{count.train / xla:.3f}",
      "MFU": mfu,
  })
  print(f"\nstep ms: median of {len(times)} steps (mean beside it) after {_WARMUP.value} warm-up; "
        f"last loss {float(metrics['loss']):.4f}, finite {int(metrics['finite'])}")
  print(f"peak: {'n/a' if peak is None else f'{peak:g} TFLOP/s'} ({peak_note})")
  print("analytic: matmul/conv FLOPs of forward + backward, 2 per multiply-add, backward by "
        "what trains (unires_jax/train/flops.py); XLA: cost analysis of the step compiled for "
        "one device, elementwise work and the optimizer included")
  print_modules(count)


if __name__ == "__main__":
  app.run(main)
