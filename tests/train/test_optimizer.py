"""The optimizer and the train step: schedule, multipliers, freezing, accumulation, skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unires_jax import parallel, utils
from unires_jax.config_lib import load_config
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.models.unires import compute_loss
from unires_jax.train import optimizer as optimizer_lib
from unires_jax.train import step as step_lib
from unires_jax.train import trainer
from unires_jax.train.state import StateFactory

LR = 1e-3


def _config(**train):
  config = load_config("configs/tiny.py")
  config.train.update(num_steps=100, **train)
  config.optimizer.update(learning_rate=LR, warmup_steps=0, weight_decay=0.0)
  config.optimizer.lr_multipliers = {"vision": 0.0, "convnext": 0.0,
                                     "llm/model/embed_tokens": 0.5}
  return config


def _mesh():
  return parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _flat(params):
  return {utils.path_str(p): np.asarray(v.get_value()) for p, v in
          jax.tree_util.tree_leaves_with_path(params,
                                              is_leaf=lambda x: isinstance(x, nnx.Variable))}


@pytest.fixture(scope="module")
def stage1():
  """The stage-1 step; the two tests that run it share a worker (`xdist_group`), so it compiles
  once."""
  config = _config()
  mesh = _mesh()
  factory = StateFactory(config, mesh)
  return config, mesh, factory, step_lib.make_train_step(factory)


def _batch(config, mesh, seed=0, **kw):
  batch = synthetic_batch(config.model, 4, seed=seed, no_target_every=2)
  batch.update(kw)
  return parallel.shard_batch(step_lib.model_fields(batch), mesh)


def test_lr_multiplier_longest_prefix():
  table = {"llm": 0.1, "llm/model/embed_tokens": 0.0, "vision/": 2.0}
  assert optimizer_lib.lr_multiplier("llm/model/layers/0/mlp/up_proj/kernel", table) == 0.1
  assert optimizer_lib.lr_multiplier("llm/model/embed_tokens/embedding", table) == 0.0
  assert optimizer_lib.lr_multiplier("vision/embeddings/patch_embedding/kernel", table) == 2.0
  assert optimizer_lib.lr_multiplier("llm_head/kernel", table) == 1.0  # whole components only
  assert optimizer_lib.lr_multiplier("mask_decoder/x", table) == 1.0


def test_multiplier_errors(stage1):
  config, mesh, _, _ = stage1
  bad = _config()
  bad.optimizer.lr_multipliers = {"visoin": 0.0}
  with pytest.raises(ValueError, match=r"lr_multipliers\['visoin'\] matches no parameter"):
    StateFactory(bad, mesh)
  bad.optimizer.lr_multipliers = {"vision": -1.0}
  with pytest.raises(ValueError, match="is negative"):
    StateFactory(bad, mesh)


def test_schedule_warmup_then_cosine():
  config = _config()
  config.optimizer.update(warmup_steps=10, end_lr_fraction=0.1)
  schedule = optimizer_lib.learning_rate_schedule(config.optimizer, 100)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, LR / 2, LR],
                             rtol=1e-6)
  np.testing.assert_allclose(schedule(55), LR * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half-way cosine
  np.testing.assert_allclose(schedule(100), LR * 0.1, rtol=1e-6)
  config.optimizer.warmup_steps = 100
  with pytest.raises(ValueError, match="warmup_steps=100"):
    optimizer_lib.learning_rate_schedule(config.optimizer, 100)


@pytest.mark.xdist_group("optimizer_stage1")
def test_frozen_towers_and_multipliers(stage1):
  config, mesh, factory, step = stage1
  state = factory.create()
  before = _flat(state.params)
  frozen_state = [utils.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      state.opt_state) if "vision" in utils.path_str(p) or "convnext" in utils.path_str(p)]
  assert not frozen_state, frozen_state[:3]  # no optimizer state for frozen parameters
  state, metrics = step(state, _batch(config, mesh))
  assert int(metrics["finite"]) == 1 and float(metrics["learning_rate"]) == pytest.approx(LR)
  after = _flat(state.params)
  for path in before:
    moved = np.max(np.abs(after[path] - before[path]))
    if path.startswith(("vision/", "convnext/")):
      assert moved == 0.0, path
    elif path == "llm/model/embed_tokens/embedding":
      # Adam's first step moves each entry with a gradient by lr * multiplier (|m/sqrt(v)| = 1).
      assert moved == pytest.approx(0.5 * LR, rel=1e-3)
    elif path == "llm/lm_head/kernel":
      assert moved == pytest.approx(LR, rel=1e-3)


@pytest.mark.xdist_group("optimizer_stage1")
def test_nonfinite_step_is_skipped_and_counted(stage1):
  config, mesh, factory, step = stage1
  state = factory.create()
  before = _flat(state.params)
  images = np.asarray(synthetic_batch(config.model, 4, seed=0)["image_high"]).copy()
  images[0, 0, 0, 0] = np.nan
  state, metrics = step(state, _batch(config, mesh, image_high=images))
  assert int(metrics["finite"]) == 0 and not np.isfinite(float(metrics["loss"]))
  assert (int(state.nonfinite_in_row), int(state.nonfinite_total), int(state.step)) == (1, 1, 1)
  after = _flat(state.params)
  assert all(np.array_equal(after[k], before[k]) for k in before)
  state, metrics = step(state, _batch(config, mesh))
  assert int(metrics["finite"]) == 1
  assert (int(state.nonfinite_in_row), int(state.nonfinite_total)) == (0, 1)
  # The first applied update is Adam's first: the skipped step left no trace in its moments.
  assert float(metrics["learning_rate"]) == pytest.approx(LR)
  with pytest.raises(trainer.NonFiniteError, match="3 steps in a row"):
    trainer._check_finite(jnp.int32(3), 3)
  trainer._check_finite(jnp.int32(2), 3)


@pytest.mark.slow
def test_accumulation_averages_micro_batches():
  config = _config(accum_steps=2)
  mesh = _mesh()
  factory = StateFactory(config, mesh)
  state = factory.create()
  raw = synthetic_batch(config.model, 4, seed=3, no_target_every=2)
  model = nnx.merge(factory.graphdef, state.params)
  micro_loss = nnx.jit(lambda model, micro: compute_loss(model(micro), micro,
                                                          config.model.loss)[0])
  micro_losses = []
  for rows in ([0, 2], [1, 3]):  # micro-batch j holds rows j, j + accum_steps, ...
    micro = {k: jnp.asarray(v[rows]) for k, v in step_lib.model_fields(raw).items()}
    micro_losses.append(float(micro_loss(model, micro)))
  state, metrics = step_lib.make_train_step(factory)(
      state, parallel.shard_batch(step_lib.model_fields(raw), mesh))
  assert float(metrics["loss"]) == pytest.approx(np.mean(micro_losses), rel=1e-5)
  with pytest.raises(ValueError, match="accum_steps=3"):
    bad = _config(accum_steps=3)
    # The same model and optimizer: the new state above fits this step too (one init fewer).
    step_lib.make_train_step(StateFactory(bad, mesh))(state, parallel.shard_batch(
        step_lib.model_fields(raw), mesh))


def test_compiler_options_from_the_config():
  """`config.train.exec_time_optimization_effort` becomes the step's XLA compile option (the TPU
  compile test checks that it changes the program); bad values are named."""
  config = load_config("configs/tiny.py")
  assert step_lib.compiler_options(config) is None  # 0: the compiler's default, no option
  config.train.exec_time_optimization_effort = -1.0
  assert step_lib.compiler_options(config) == {"exec_time_optimization_effort": -1.0}
  del config.train["exec_time_optimization_effort"]  # a config written before the field
  assert step_lib.compiler_options(config) is None
  for bad in (1.5, -2, True, "low"):  # each as its own field's type (ConfigDict keeps types)
    if "exec_time_optimization_effort" in config.train:
      del config.train["exec_time_optimization_effort"]
    config.train.exec_time_optimization_effort = bad
    with pytest.raises(ValueError, match=r"config.train.exec_time_optimization_effort must be "
                                         r"a number in \[-1, 1\]"):
      step_lib.compiler_options(config)
