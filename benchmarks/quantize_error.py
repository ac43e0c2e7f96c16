r"""What int8 / int4 weights change in the full-width model's outputs, part by part (a sanity check
of what `config.model.quantize` quantizes, on random weights: no released weights here).

  python benchmarks/quantize_error.py [--config=configs/unires_pp_7b.py:llm_layers=2] \
      [--weights=int8,int4] [--parts=llm,vision,convnext,llm+vision]

Initialises the config's model (random weights, `config.train.seed`) on this host's devices,
computes the predict step (`parallel.make_predict`) on one synthetic sample
(`models.synthetic.synthetic_batch`) with float weights, then with the weights of each part (or
`+`-joined parts) quantized (`ShardedModel.quantized`, as `unires-segment --quantize` loads a
float checkpoint), and prints per weight type and part the relative error of the mask logits
(`|q - f| / |f|`, L2 over the mask) and of the no-target logit, and how many kernels and
weights were quantized. Computes in float32 (`--config.model.dtype`), so the error is the
weights' alone. The default keeps the 7B widths with 2 of its 32 LLaMA layers: about 5 GB of
float32 weights, a few minutes on 2 CPU cores.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unires_jax import config_lib, inference, parallel, utils
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.models.unires import INPUT_KEYS

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_lib.resolve("configs/unires_pp_7b.py") + ":llm_layers=2",
    "Config file; override fields with --config.x=y.")
_WEIGHTS = flags.DEFINE_list("weights", ["int8", "int4"], "Quantized weight types.")
_PARTS = flags.DEFINE_list("parts", ["llm", "vision", "convnext", "llm+vision"],
                           "Parts quantized in each row; '+' joins parts into one row.")


def _relative(q: np.ndarray, f: np.ndarray) -> float:
  return float(np.linalg.norm((q - f).ravel()) / np.linalg.norm(f.ravel()))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config.model.dtype = "float32"
  config = inference.inference_config(config)  # parameters in float32 too
  mesh = inference.local_mesh()
  model = parallel.ShardedModel(config, mesh)
  params = model.create()
  sample = synthetic_batch(config.model, mesh.size)
  batch = parallel.shard_batch({k: sample[k] for k in INPUT_KEYS}, mesh)
  reference = {k: np.asarray(v) for k, v in parallel.make_predict(model)(params, batch).items()}
  print(f"{config.model.llm.num_layers} LLaMA layers, {mesh.size} rows, float32 compute; "
        f"L2 of the float mask logits {np.linalg.norm(reference['mask_logits']):.4g}", flush=True)
  print(f"\n{'weights':<8}{'parts':<20}{'kernels':>8}{'M weights':>11}{'mask logits':>13}"
        f"{'no-target':>11}")
  for weights in _WEIGHTS.value:
    for parts in _PARTS.value:
      qconfig = config.copy_and_resolve_references()
      qconfig.model.quantize.update(weights=weights, parts=parts.replace("+", ","))
      qmodel = parallel.ShardedModel(qconfig, mesh)
      qparams = qmodel.quantized(model.graphdef, jax.tree.map(jnp.copy, params))
      out = parallel.make_predict(qmodel)(qparams, batch)
      qvalues = [x for p, x in jax.tree_util.tree_flatten_with_path(qparams)[0]
                 if "/qvalue/" in utils.path_str(p)]
      count = sum(x.size for x in qvalues)
      print(f"{weights:<8}{parts:<20}{len(qvalues):>8}{count / 1e6:>11.1f}"
            f"{_relative(np.asarray(out['mask_logits']), reference['mask_logits']):>13.4f}"
            f"{_relative(np.asarray(out['no_target_logits']), reference['no_target_logits']):>11.4f}",
            flush=True)
      del qparams, out
  print("relative error: L2 of (quantized - float) over L2 of float, over the batch; kernels: "
        "quantized arrays (a stacked layer's counts once)")


if __name__ == "__main__":
  app.run(main)
