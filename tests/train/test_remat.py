"""`config.model.remat` in the sharded train step: "full" and "dots" give the loss and the
gradients of "none" (rematerialisation recomputes the same forward; only XLA's fusion of it may
differ, at float32 rounding level)."""

import numpy as np
import pytest

from unires_jax import parallel
from unires_jax.config_lib import load_config
from unires_jax.models import layers
from unires_jax.models.synthetic import synthetic_batch
from tests.train.test_sharded_step import _clipped_gradients, run_one_step

# One worker runs the whole module (--dist loadgroup), so its module fixture `reference` (the "none"
# step) is set up once; with the tests spread over both workers each worker set it up.
pytestmark = pytest.mark.xdist_group("remat")

RTOL = 1e-5  # float32: loss relative, gradients relative to the whole gradient's norm


def _config(remat: str, scan_layers: bool = False):
  config = load_config("configs/tiny.py")
  config.model.remat = remat
  config.model.scan_layers = scan_layers
  # The smallest model that still has remat'ed CLIP and LLaMA layers; train all of it, so the
  # vision tower's layers are differentiated too (stage 1 would freeze them).
  config.model.convnext.depths = (1, 1, 1, 1)
  config.model.mask_decoder.num_layers = 1
  config.optimizer.lr_multipliers = {}
  config.optimizer.update(learning_rate=1e-3, warmup_steps=0)
  return config


def _unstacked(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for path, g in grads.items():
    if layers.is_stacked_path(path):
      out.update({layers.layer_path(path, i): g[i] for i in range(g.shape[0])})
    else:
      out[path] = g
  return out


def _step(remat: str, scan_layers: bool = False):
  """(metrics, clipped gradients) of one step on a 2x2x2 mesh, gradients by unrolled path."""
  config = _config(remat, scan_layers)
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
  batch = synthetic_batch(config.model, 4, seed=1, no_target_every=3)
  _, state, metrics = run_one_step(config, mesh, batch)
  grads = _clipped_gradients(state, config)
  if scan_layers:  # the stacked layers' gradients, one per layer under its unrolled path
    grads = _unstacked(grads)
  return metrics, grads


@pytest.fixture(scope="module")
def reference():
  return _step("none")


@pytest.mark.slow
@pytest.mark.parametrize("policy,scan_layers", [("full", False), ("dots", True)])
def test_remat_step_equals_none(policy, scan_layers, reference):
  """Each policy once (each compile of the sharded step costs about a minute): "full" unrolled,
  "dots" inside the scan body of scanned layers, against the unrolled reference."""
  ref_metrics, g_ref = reference
  metrics, g = _step(policy, scan_layers)
  assert metrics["finite"] == 1
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=RTOL)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=RTOL)
  assert g.keys() == g_ref.keys()
  assert any("vision/encoder/layers" in k for k in g) and any("llm/model/layers" in k for k in g)
  diff = np.sqrt(sum(np.sum((g[k] - g_ref[k]) ** 2) for k in g_ref))
  norm = np.sqrt(sum(np.sum(x ** 2) for x in g_ref.values()))
  assert diff <= RTOL * norm, f"gradients differ by {diff / norm:.2e} of their norm"
