"""One train step sharded over (data=2, fsdp=2, tensor=2) equals the unsharded step."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from unires_jax import parallel, utils
from unires_jax.train import step as step_lib
from unires_jax.train.state import StateFactory
from tests import tiny_step

RTOL = 1e-5  # the acceptance bound
# Adam's first step moves each parameter by about lr * sign(gradient), so where a gradient is at
# float32 rounding level the two runs may step in opposite directions. Three cases:
# - the key projections' biases: their gradient is exactly 0 in exact arithmetic (softmax ignores
#   a per-query constant); both runs must agree that it is ~0;
# - entries whose gradient is not resolved, |g| <= RESOLVED * rms(g of the tensor), or where
#   Adam's first update lr * g / (|g| + eps) is ill-conditioned: its relative change is
#   eps / (|g| + eps) times the gradient's, and measured gradient differences reach 2e-7 (norm 1
#   after clipping), so |g| must exceed ~1.4e-5 = CONDITIONED * eps for a 1e-5 bound. These are
#   compared as gradients (the whole-gradient check);
# - every other entry (66% of them with this config) must agree as a parameter within RTOL.
RESOLVED = 1e-3
CONDITIONED = 1e3
ZERO_GRADIENT = "k_proj/bias"
ZERO = 1e-7  # |g| of a zero-gradient tensor, relative to the whole gradient's norm


def run_one_step(config, mesh, batch):
  """One step of `config` from a fresh state on `mesh`, compiled for it (tests/train/test_remat.py:
  its configs are not the shared tiny step's)."""
  factory = StateFactory(config, mesh)
  state = factory.create()
  step = step_lib.make_train_step(factory)
  state, metrics = step(state, parallel.shard_batch(step_lib.model_fields(batch), mesh))
  return factory, state, jax.device_get(metrics)


def _flat(tree):
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {utils.path_str(p): np.asarray(v.get_value(), np.float64) for p, v in leaves
          if hasattr(v.get_value(), "shape")}


def _clipped_gradients(state, config):
  """The clipped gradient of the first step, read back from Adam's first moment
  (mu = (1 - b1) * g after one step)."""
  mus = [s.mu for s in jax.tree_util.tree_leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState)]
  grads = {}
  for mu in mus:
    grads.update({k: v / (1 - config.optimizer.b1) for k, v in _flat(mu).items()})
  return grads


def _one_step(tiny_steps, mesh: str):
  """The shared tiny step (tests/tiny_step.py) once from the initial state on `mesh`."""
  state, metrics = tiny_steps.step(mesh)(tiny_steps.initial_state(mesh),
                                         tiny_steps.batch(mesh, seed=1))
  return state, jax.device_get(metrics)


@pytest.mark.slow
@pytest.mark.xdist_group(tiny_step.GROUP)
def test_sharded_step_equals_unsharded_and_follows_rules(tiny_steps):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  config = tiny_steps.config
  ref_state, ref_metrics = _one_step(tiny_steps, "single")
  state, metrics = _one_step(tiny_steps, "2x2x2")
  factory, mesh = tiny_steps.factory("2x2x2"), tiny_steps.mesh("2x2x2")

  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=RTOL)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=RTOL)
  assert metrics["finite"] == 1

  g_ref, g_got = _clipped_gradients(ref_state, config), _clipped_gradients(state, config)
  assert g_ref.keys() == g_got.keys() and len(g_ref) > 200
  diff = np.sqrt(sum(np.sum((g_got[k] - g_ref[k]) ** 2) for k in g_ref))
  norm = np.sqrt(sum(np.sum(g ** 2) for g in g_ref.values()))
  assert diff <= RTOL * norm, f"gradients differ by {diff / norm:.2e} of their norm"

  ref, got = _flat(ref_state.params), _flat(state.params)
  assert ref.keys() == got.keys() and len(ref) == len(g_ref)
  checked = total = 0
  for path, b in ref.items():
    g = g_ref[path]
    if path.endswith(ZERO_GRADIENT):
      assert max(np.linalg.norm(g), np.linalg.norm(g_got[path])) <= ZERO * norm, path
      continue
    resolved = ((np.abs(g) > RESOLVED * np.sqrt(np.mean(g * g)))
                & (np.abs(g) > CONDITIONED * config.optimizer.eps))
    scale = np.maximum(np.abs(b), np.sqrt(np.mean(b * b)))
    worst = np.max((np.abs(got[path] - b) / scale)[resolved], initial=0.0)
    assert worst <= RTOL, f"{path}: relative difference {worst:.2e} > {RTOL}"
    checked, total = checked + resolved.sum(), total + resolved.size
  assert checked >= 0.6 * total, f"only {checked} of {total} parameters compared"

  # Every parameter is sharded as the rules say, each device holding just its block.
  arrays = {utils.path_str(p): v.get_value() for p, v in jax.tree_util.tree_leaves_with_path(
      state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  expected = {utils.path_str(p): v.get_value() for p, v in jax.tree_util.tree_leaves_with_path(
      parallel.state_shardings(factory.abstract.params, mesh, factory.model.rules),
      is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert arrays.keys() == expected.keys()
  sharded_both = 0
  for path, array in arrays.items():
    want = expected[path]
    assert array.sharding.is_equivalent_to(want, array.ndim), (path, array.sharding, want.spec)
    assert array.addressable_shards[0].data.shape == want.shard_shape(array.shape), path
    sharded_both += "fsdp" in want.spec and "tensor" in want.spec
  assert sharded_both >= 20  # every LLM / ViT kernel at least

  # The optimizer moments follow their parameters.
  mu = [s for s in jax.tree_util.tree_leaves(state.opt_state) if s.ndim == 2]
  assert mu and all(len(m.sharding.device_set) == 8 for m in mu)
  assert any(m.addressable_shards[0].data.size < m.size for m in mu)
