"""jaxlib 0.10.2's gradient bug for grouped convolutions on a mesh, and the ConvNeXt switch
`grouped_conv_grad_bug_workaround` that avoids it (on the 8 CPU devices of tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from unires_jax import parallel, utils
from unires_jax.config_lib import load_config
from unires_jax.models.convnext import ConvNeXt

MESH = dict(data=2, fsdp=2, tensor=2)  # the batch over data x fsdp, each row on 2 devices
ROWS = PartitionSpec(("data", "fsdp"))


def _depthwise(x, kernel):
  """`[batch, h, w, c]` * `[7, 7, 1, c]`, "same" padding, one group per channel."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((3, 3), (3, 3)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1])


def test_jaxlib_grouped_conv_kernel_gradient_bug_is_still_there():
  """The bug itself, on a bare convolution. When this fails, jaxlib computes the gradient right:
  set `grouped_conv_grad_bug_workaround` to False in configs/unires_pp_7b.py and check that
  tests/train/test_sharded_step.py still passes, then drop the switch."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 8, 8, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(7, 7, 1, 4)), jnp.float32)
  loss = lambda k, x: jnp.sum(_depthwise(x, k) ** 2)
  expected = jax.grad(loss)(kernel, x)
  mesh = parallel.make_mesh(MESH)
  grad = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, PartitionSpec()))(
      jax.device_put(kernel, NamedSharding(mesh, PartitionSpec())),
      jax.device_put(x, NamedSharding(mesh, ROWS)))
  # Multiplied by the 2 devices that hold each row (the tensor axis): still wrong.
  np.testing.assert_allclose(np.asarray(grad), 2 * np.asarray(expected), rtol=1e-4, atol=1e-3)


def _grads(model: ConvNeXt, x: np.ndarray, mesh=None):
  """(stage outputs, gradient of their sum of squares by parameter path), on `mesh` with the
  batch split over data x fsdp and the parameters replicated, or on one device."""
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, x):
    features = nnx.merge(graphdef, params)(x)
    return sum(jnp.sum(f**2) for f in features), features

  fn = jax.grad(loss, has_aux=True)
  if mesh is None:
    grads, features = jax.jit(fn)(params, x)
  else:
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    x = jax.device_put(x, NamedSharding(mesh, ROWS))
    rules = parallel.rules_from_config(load_config("tiny"))
    grads, features = parallel.on_mesh(mesh, rules, jax.jit(fn, out_shardings=replicated))(
        params, x)
  flat = {utils.path_str(p): np.asarray(v.get_value()) for p, v in
          jax.tree_util.tree_leaves_with_path(grads, is_leaf=lambda v: isinstance(v, nnx.Variable))}
  return [np.asarray(f) for f in features], flat


@pytest.mark.parametrize("workaround", [True, False])
def test_the_switch_keeps_outputs_and_fixes_the_depthwise_kernel_gradient(workaround):
  cfg = load_config("tiny").model.convnext
  cfg.grouped_conv_grad_bug_workaround = workaround
  model = ConvNeXt(cfg, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(size=(4, 64, 64, 3)).astype(np.float32)
  expected_features, expected = _grads(model, x)
  features, grads = _grads(model, x, parallel.make_mesh(MESH))
  for got, want in zip(features, expected_features):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  depthwise = sorted(p for p in grads if "/conv_dw/kernel" in p)
  assert depthwise
  for path in depthwise:
    # With the switch off the partitioner's gradient is twice the right one (the bug above).
    np.testing.assert_allclose(grads[path], (1 if workaround else 2) * expected[path],
                               rtol=2e-3, atol=2e-3, err_msg=path)
  for path in set(grads) - set(depthwise):
    np.testing.assert_allclose(grads[path], expected[path], rtol=2e-3, atol=2e-3,
                               err_msg=path)
