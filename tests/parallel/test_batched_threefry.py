"""`batch_threefry`: the same bits as the function itself, from as few threefry calls as the
dependencies allow, and the function itself where it cannot batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unires_jax import config_lib, parallel
from unires_jax.models import layers
from unires_jax.parallel import batched_threefry
from unires_jax.parallel.batched_threefry import batch_threefry
from unires_jax.parallel.sharded_model import build


def _draws(seed):
  """Parameter-like draws: keys folded from a seed, keys of a key array, splits, several
  distributions and shapes, and a draw from a key that a draw's bits made (depth 3)."""
  keys = layers.ParamKeys(seed)
  out = {
      "lecun": nnx.initializers.lecun_normal()(keys.params(), (5, 7)),
      "normal": jax.random.normal(keys.params(), (3, 2, 4)),
      "uniform": jax.random.uniform(keys.params(), (11,), minval=-1.0),
      "bernoulli": jax.random.bernoulli(keys.params(), 0.3, (4, 4)),
      "bits64": jax.random.bits(keys.params(), (3,), jnp.uint8),
      "scalar": jax.random.normal(keys.params(), ()),
  }
  batch = jax.random.split(keys.params(), 3)  # a key array [3]
  out["batch"] = jax.vmap(lambda k: jax.random.normal(k, (2,)))(batch)
  out["batch_folded"] = jax.vmap(jax.random.fold_in)(batch, jnp.arange(3, dtype=jnp.uint32))
  out["batch_folded"] = jax.random.key_data(out["batch_folded"])
  chained = jax.random.fold_in(keys.params(), jax.random.bits(keys.params(), (), jnp.uint32))
  out["chained"] = jax.random.normal(chained, (6,))
  return out


def _threefry_calls(fn):
  jaxpr = jax.make_jaxpr(fn)()
  count = 0
  for eqn in jaxpr.jaxpr.eqns:
    assert eqn.primitive.name != "jit"  # everything inlined
    count += eqn.primitive is batched_threefry.threefry2x32_p
  return count


@pytest.mark.parametrize("partitionable", [True, False])
def test_same_bits_from_one_call_per_depth(partitionable):
  with jax.threefry_partitionable(partitionable):
    expected = jax.jit(lambda: _draws(0))()
    got = jax.jit(batch_threefry(lambda: _draws(0)))()
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for name in expected:
      np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]), err_msg=name)
    # Keys (seed, folds), draws and the split, the chained fold, its draw: 4 depths, where the
    # function itself makes one call per key and per draw.
    assert _threefry_calls(batch_threefry(lambda: _draws(0))) == 4
    plain = jax.make_jaxpr(lambda: _draws(0))()
    assert "random_bits" in str(plain)  # jax's own calls, one per draw, hidden in its primitives


def test_arguments_and_outputs_pass_through():
  def fn(x, seed):
    return {"y": x * jax.random.normal(jax.random.key(seed), x.shape), "x": x}

  x = jnp.arange(6.0).reshape(2, 3)
  expected = jax.jit(fn)(x, 7)
  got = jax.jit(batch_threefry(fn))(x, 7)
  np.testing.assert_array_equal(got["y"], expected["y"])
  np.testing.assert_array_equal(got["x"], x)


@pytest.mark.parametrize("case", ["rbg_keys", "keys_out", "keys_through_scan"])
def test_falls_back_to_the_function_itself(case):
  if case == "rbg_keys":
    fn = lambda: jax.random.normal(jax.random.key(0, impl="rbg"), (4,))
  elif case == "keys_out":
    fn = lambda: jax.random.split(jax.random.key(0))
  else:
    def fn():
      def body(key, _):
        key, sub = jax.random.split(key)
        return key, jax.random.normal(sub, (2,))
      return jax.lax.scan(body, jax.random.key(0), None, length=3)[1]
  expected = jax.jit(fn)()
  got = jax.jit(batch_threefry(fn))()
  if case == "keys_out":
    expected, got = jax.random.key_data(expected), jax.random.key_data(got)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.slow
def test_tiny_model_init_on_the_cpu_is_nnx_init_bit_for_bit():
  """`ShardedModel.init_params` batches on the CPU; the parameters are those NNX draws."""
  config = config_lib.load_config("tiny")
  config.model.llm.lora.rank = 2  # adapters too (models/lora.py draws from folded keys)
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  model = parallel.ShardedModel(config, mesh)
  # All parameter keys, then all draws and the adapters' A keys (fold_in(key, 1)), then their
  # draws: where NNX makes one call per key and per draw (392 without adapters).
  assert _threefry_calls(model.init_params) == 3
  got = model.create()
  expected = jax.jit(lambda: nnx.state(build(config), nnx.Param),
                     out_shardings=model.shardings)()
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  assert len(got_leaves) > 100
  for (path, a), b in zip(got_leaves, jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
