r"""The smallest single TPU chip on which the 7B predict step fits, per weight type and batch.

  pip install -e '.[test]'     # the test extra brings jax[tpu] (libtpu)
  python benchmarks/single_chip.py [--config=configs/unires_pp_7b.py] \
      [--weights=float32,bfloat16,int8,int4] [--batches=1,8] [--chips=v5e:1x1,v6e:1x1,v5p:1x1x1]

For each weight type and batch, compiles the predict step (`parallel.make_predict`: masks and
no-target logits, what `unires-segment` runs) for one chip of each generation in `--chips`, in
that order, until it fits (the compiler refuses a program larger than the chip's HBM); then, on
that chip, counts its cost-model time layer by layer (`aot.layerwise_cost(step="predict")`: XLA
counts a scanned loop's body once). Weight types:
  float32   the float32 master weights that training keeps (`model.param_dtype` float32)
  bfloat16  every parameter in the compute dtype, as `unires-segment` reads them
            (`inference.inference_config`)
  int8/int4 the linear layers of `model.quantize.parts` quantized (`models.quantize`, qwix),
            everything else in bfloat16
Prints one table: per row the chips tried (fits, or the compiler's size), the per-chip memory
(parameters, temporaries, total) on the chip it fits, the cost model's time per call and per
image there (an estimate, not a measurement). Nothing executes; the 7B compiles take about a
minute each here, the layer-by-layer count five small compiles more.
"""

import gc
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from unires_jax import config_lib, inference
from unires_jax.train import aot

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_lib.resolve("configs/unires_pp_7b.py"),
    "Config file; override fields with --config.x=y.")
_WEIGHTS = flags.DEFINE_list("weights", ["float32", "bfloat16", "int8", "int4"],
                             "Weight types (see the module doc).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes (images per call).")
_CHIPS = flags.DEFINE_list("chips", ["v5e:1x1", "v6e:1x1", "v5p:1x1x1"],
                           "One-chip topologies, tried in this order (smallest HBM first).")
_LAYERWISE = flags.DEFINE_bool("layerwise_cost", True,
                               "Count the cost-model time layer by layer on the chip it fits.")

GIB = 2**30
WEIGHT_TYPES = ("float32", "bfloat16", "int8", "int4")


def weights_config(config, weights: str):
  """`config` holding its parameters as `weights` says (see the module doc)."""
  if weights not in WEIGHT_TYPES:
    raise app.UsageError(f"--weights: unknown {weights!r}; choose from {WEIGHT_TYPES}")
  if weights == "float32":
    out = config.copy_and_resolve_references()
    out.model.param_dtype = "float32"
    return out
  return inference.inference_config(config, None if weights == "bfloat16" else weights)


def _too_large(error: Exception) -> str | None:
  """The compiler's words when a program does not fit the chip's HBM, else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  return " ".join(text.split("RESOURCE_EXHAUSTED:")[-1].split())[:160]


HEADER = (f"{'weights':<10}{'batch':>6}  {'smallest chip':<14}{'params GiB':>11}{'temp GiB':>10}"
          f"{'total GiB':>10}{'HBM GiB':>9}{'est. ms/call':>13}{'est. ms/image':>14}  tried")


def _row(weights: str, batch: int, tried: list[str], fit) -> str:
  """One line of the table (`HEADER`)."""
  if fit is None:
    return (f"{weights:<10}{batch:>6}  {'none':<14}{'':>11}{'':>10}{'':>10}{'':>9}{'':>13}"
            f"{'':>14}  {'; '.join(tried)}")
  gen, memory, seconds = fit
  per_call = f"{seconds * 1e3:.1f}" if seconds else "n/a"
  per_image = f"{seconds * 1e3 / batch:.1f}" if seconds else "n/a"
  return (f"{weights:<10}{batch:>6}  {gen:<14}{memory['arguments'] / GIB:>11.2f}"
          f"{memory['temp'] / GIB:>10.2f}{memory['total'] / GIB:>10.2f}"
          f"{aot.HBM_GIB[gen]:>9g}{per_call:>13}{per_image:>14}  {'; '.join(tried)}")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  base = _CONFIG.value
  quantized = ", ".join(f"{k}={v}" for k, v in base.model.quantize.items() if k != "weights")
  print(f"predict step of {base.model.llm.num_layers}-layer LLaMA config, compute "
        f"{base.model.dtype}, quantize {quantized}", flush=True)
  rows = []
  for weights in _WEIGHTS.value:
    config = weights_config(base, weights)
    for batch in map(int, _BATCHES.value):
      tried, fit = [], None
      for chip in _CHIPS.value:
        gen = aot.generation(chip)
        mesh = aot.topology_mesh(chip, config.mesh)
        if mesh.size != 1:
          raise app.UsageError(f"--chips: {chip} has {mesh.size} chips, not one")
        try:
          compiled = aot.compile_predict_step(config, mesh, batch)
        except Exception as e:  # pylint: disable=broad-except
          if _too_large(e) is None:
            raise
          tried.append(f"{gen}: no ({_too_large(e)})")
          print(f"{weights} batch {batch} on {chip}: does not fit: {_too_large(e)}", flush=True)
          continue
        memory = compiled.memory
        print(f"{weights} batch {batch} on {chip}: {memory['total'] / GIB:.2f} GiB of "
              f"{aot.HBM_GIB[gen]:g}, compiled in {compiled.seconds:.0f} s", flush=True)
        if memory["total"] / GIB > aot.HBM_GIB[gen]:
          tried.append(f"{gen}: no ({memory['total'] / GIB:.2f} GiB)")
          continue
        seconds = None
        if _LAYERWISE.value:
          seconds = aot.layerwise_cost(config, mesh, batch, step="predict").seconds
        fit = (gen, memory, seconds)
        tried.append(f"{gen}: fits")
        del compiled
        gc.collect()
        break
      rows.append(_row(weights, batch, tried, fit))
      print("  " + rows[-1], flush=True)  # kept if a long run is stopped before the table

  print(f"\n{HEADER}")
  print("\n".join(rows))
  print("memory per chip from the compiled program (params: its arguments, the batch included); "
        "est. ms: the compiler's cost model counted layer by layer (aot.layerwise_cost), an "
        "estimate, not a measurement")


if __name__ == "__main__":
  app.run(main)
