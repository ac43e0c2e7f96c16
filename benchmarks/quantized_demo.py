r"""The trained demo model with int8 / int4 weights against itself in float, on the held-out split.

  unires-demo --workdir=/tmp/demo            # the README's first command
  python benchmarks/quantized_demo.py --workdir=/tmp/demo [--weights=int8,int4] \
      [--parts=llm,vision]

Loads the run's checkpoint as `unires-segment --quantize=W` does (`inference.restore`: the float
parameters quantized as they load, `config.model.quantize.parts` set by `--parts`), predicts
every expression of the held-out evaluator's split (`config.evals`, the first entry) with the
float model and each quantized one, and prints per weight type:
  * verdict agreement: the share of expressions whose no-target verdict (at the run's calibrated
    threshold) is the float model's;
  * mask IoU to float: the IoU between the two models' masks at the image's size (before a
    no-target verdict empties them), median and 5th percentile over the expressions where the
    float model's mask is not empty;
  * the demo's metrics (mIoU, N-acc, T-acc) of each, as `unires-eval --quantize` reports them;
  * the bytes of the quantized layers' kernels.
"""

from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from unires_jax import checkpoint, inference, parallel
from unires_jax.data import pipeline, tokenizer
from unires_jax.evaluation import evaluator
from unires_jax.models.unires import INPUT_KEYS

_WORKDIR = flags.DEFINE_string("workdir", None, "An unires-demo (or unires-train) run directory.",
                               required=True)
_WEIGHTS = flags.DEFINE_list("weights", ["int8", "int4"], "Quantized weight types to compare.")
_PARTS = flags.DEFINE_string("parts", None, "config.model.quantize.parts (default: the run's "
                             "config, llm,vision).")
_TILE = flags.DEFINE_integer("tile_size", 0, "config.model.quantize.tile_size.")


def _outputs(config, model, params, tokenize, dataset: str, split: str, batch_size: int):
  """[(masks at the image's size, no-target verdicts)] per valid row, in the split's order."""
  predict = parallel.make_predict(model)
  threshold = float(config.model.no_target_threshold)
  logit_threshold = np.log(threshold / (1 - threshold))
  rows = []
  data = pipeline.eval_dataset(config, dataset, split, tokenize, batch_size=batch_size)
  for batch in evaluator.batches_in_step(data):
    out = evaluator.local_rows(predict(params, parallel.shard_batch(
        {k: batch[k] for k in INPUT_KEYS}, model.mesh)), model.mesh)
    for row in np.flatnonzero(batch["valid"]):
      mask = evaluator.to_original(out["mask_logits"][row], batch["original_size"][row],
                                   batch["scale"][row])
      rows.append((mask, bool(out["no_target_logits"][row] > logit_threshold)))
  return rows


def _kernel_bytes(params) -> int:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for p, x in flat
             if "kernel" in jax.tree_util.keystr(p))  # int4: half a byte, as a TPU stores it


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = _WORKDIR.value
  base = inference.inference_config(checkpoint.locate(workdir).config())
  if _PARTS.value:
    base.model.quantize.parts = _PARTS.value
  base.model.quantize.tile_size = _TILE.value
  (name, entry), = list(base.evals.items())[:1]
  tokenize = tokenizer.load_tokenize(base.input.tokenizer)
  mesh = inference.local_mesh()
  print(f"{workdir}: evaluator {name} ({entry.dataset} {entry.split}), quantized parts "
        f"{base.model.quantize.parts}, tile size {base.model.quantize.tile_size or 'none'}, "
        f"no-target threshold {base.model.no_target_threshold:.3f}", flush=True)

  results = {}
  for weights in ["none", *_WEIGHTS.value]:
    config = base.copy_and_resolve_references()
    config.model.quantize.weights = weights
    model, params, step = inference.restore(workdir, config, mesh)
    outputs = _outputs(config, model, params, tokenize, entry.dataset, entry.split,
                       entry.batch_size)
    metrics = evaluator.evaluate(config, params, parallel.make_predict(model), mesh, tokenize,
                                 entry.dataset, entry.split, batch_size=entry.batch_size,
                                 protocol=entry.protocol, resolution=entry.resolution).metrics
    results[weights] = (outputs, metrics, _kernel_bytes(params))
    print(f"{weights}: step {step}, {len(outputs)} expressions, mIoU {metrics['mIoU']:.3f}",
          flush=True)

  reference = results["none"][0]
  header = (f"{'weights':<8}{'agree':>8}{'IoU median':>12}{'IoU p5':>9}{'mIoU':>8}"
            f"{'N-acc':>8}{'T-acc':>8}{'kernel MB':>11}")
  print("\n" + header)
  for weights, (outputs, metrics, nbytes) in results.items():
    agree = np.mean([a[1] == b[1] for a, b in zip(outputs, reference)])
    ious = [(a[0] & b[0]).sum() / (a[0] | b[0]).sum() for a, b in zip(outputs, reference)
            if b[0].any()]
    print(f"{'float' if weights == 'none' else weights:<8}{agree:>8.4f}"
          f"{np.median(ious):>12.4f}{np.percentile(ious, 5):>9.4f}{metrics['mIoU']:>8.3f}"
          f"{metrics['N-acc']:>8.3f}{metrics['T-acc']:>8.3f}{nbytes / 1e6:>11.3f}")
  print("agree: the no-target verdict is the float model's; IoU: between the two models' masks "
        "where the float one is not empty; kernel MB: every linear and convolution kernel, "
        "quantized ones with their scales")


if __name__ == "__main__":
  app.run(main)
