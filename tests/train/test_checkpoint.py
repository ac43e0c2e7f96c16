"""Orbax checkpoints: saved on one mesh, restored on another, training goes on the same."""

import jax
import numpy as np
import pytest
from flax import nnx

from unires_jax import parallel, utils
from unires_jax.checkpoint import restore_params
from unires_jax.train.checkpointer import Checkpointer
from tests import tiny_step


def _flat(tree):
  return {utils.path_str(p): v.get_value() for p, v in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))}


@pytest.mark.slow
@pytest.mark.xdist_group(tiny_step.GROUP)
def test_restore_onto_another_mesh(tiny_steps, tmp_path):
  """Trained and saved on one device, restored onto data = fsdp = tensor = 2: the shared tiny
  steps of both meshes (tests/tiny_step.py), compiled once for these tests and the sharded-step
  test."""
  step = tiny_steps.step("single")
  state = tiny_steps.initial_state("single")
  for seed in (0, 1):
    state, _ = step(state, tiny_steps.batch("single", seed))
  checkpoints = Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=2)
  assert checkpoints.save(2, state, None)
  checkpoints.wait_until_finished()
  saved = {k: np.asarray(v) for k, v in _flat(state.params).items()}
  _, metrics = step(state, tiny_steps.batch("single", 2))

  factory2 = tiny_steps.factory("2x2x2")
  restored = Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=2).restore(
      factory2.abstract_sharded(), None)
  assert int(restored.step) == 2
  expected = _flat(factory2.shardings.params)
  for path, array in _flat(restored.params).items():
    assert array.sharding.is_equivalent_to(expected[path], array.ndim), path
    np.testing.assert_array_equal(np.asarray(array), saved[path], err_msg=path)
  assert any("tensor" in s.spec and "fsdp" in s.spec for s in expected.values())

  _, metrics2 = tiny_steps.step("2x2x2")(restored, tiny_steps.batch("2x2x2", 2))
  # The same step on another layout: float32 sums in another order, nothing else.
  np.testing.assert_allclose(float(metrics2["loss"]), float(metrics["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics2["grad_norm"]), float(metrics["grad_norm"]),
                             rtol=1e-5)

  params, at = restore_params(str(tmp_path / "ckpt"), factory2.model.abstract_sharded())
  assert at == 2 and all(np.array_equal(np.asarray(v), saved[k])
                         for k, v in _flat(params).items())


@pytest.mark.slow
@pytest.mark.xdist_group(tiny_step.GROUP)
def test_keeps_the_newest_and_saves_on_the_interval(tiny_steps, tmp_path):
  state = tiny_steps.initial_state("single")
  checkpoints = Checkpointer(str(tmp_path), save_every=2, keep=2)
  saved = [checkpoints.save(s, state, None) for s in (1, 2, 3, 4, 6)]
  checkpoints.wait_until_finished()
  assert saved == [False, True, False, True, True]
  assert checkpoints.all_steps() == [4, 6] and checkpoints.latest_step() == 6
  assert checkpoints.save(7, state, None, force=True)
  checkpoints.wait_until_finished()
  assert checkpoints.latest_step() == 7
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(str(tmp_path / "empty"), save_every=1, keep=1).restore(state, None)
  with pytest.raises(ValueError, match="must be >= 1"):
    Checkpointer(str(tmp_path), save_every=0, keep=1)


def test_only_large_replicated_arrays_are_written_in_replica_slices(tmp_path):
  """`checkpoint.pytree_handler`: Orbax cuts a replicated array into one slice per replica (an
  eager `slice` compiled per shape) only where each slice holds `MIN_REPLICA_SLICE_BYTES`."""
  import logging  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from unires_jax import checkpoint  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(dict(data=8, fsdp=1, tensor=1))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  floats = 8 * checkpoint.MIN_REPLICA_SLICE_BYTES // 4  # 8 replicas: a floor's worth each
  trees = {"small": {"bias": np.arange(1000, dtype=np.float32), "scale": np.ones(64, np.float32)},
           "large": {"kernel": np.linspace(0, 1, floats, dtype=np.float32)}}

  compiles = []

  class Slices(logging.Handler):
    def emit(self, record):
      if "compilation of jit(slice)" in record.getMessage():
        compiles.append(record.getMessage())

  handler = Slices()
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles(True):
      for name, tree in trees.items():
        tree = jax.device_put(tree, replicated)
        del compiles[:]
        checkpointer = ocp.Checkpointer(checkpoint.pytree_handler())
        checkpointer.save(tmp_path / name, args=ocp.args.PyTreeSave(tree))
        slices = len(compiles)
        assert (slices > 0) == (name == "large"), (name, compiles)
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        restored = checkpointer.restore(tmp_path / name, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
        for key, value in tree.items():
          np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))
  finally:
    logging.getLogger("jax").removeHandler(handler)
