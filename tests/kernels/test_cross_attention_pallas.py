"""The Pallas masked cross-attention against the XLA reference (its specification).

On the CPU the kernels run in the Pallas interpreter, both variants (the TPU grid over key tiles
and the GPU loop over key tiles with key splits), with small blocks so that a few tiles, ragged
edges and skipped tiles appear at small sizes. The real TPU and GPU kernels are lowered (not run)
through `jax.export`.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from unires_jax import models
from unires_jax.config_lib import load_config
from unires_jax.kernels import cross_attention
from unires_jax.kernels import cross_attention_pallas as cap
from unires_jax.kernels import cross_attention_pallas_tpu
from unires_jax.kernels import cross_attention_ref
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.models.unires import compute_loss


def _inputs(rng, batch, heads, num_q, num_k, head_dim, *, block_k, dtype=np.float32):
  """Random q/k/v/cotangent and a mask with every case the rule has.

  Logits are mostly negative (sparse masks); query 0 of batch row 0 has an empty mask (attends to
  all valid keys); the second key tile is masked for every query (skippable, unless an empty row
  needs it); batch row 1 (if any) has padding keys at the end.
  """
  q, do = (rng.normal(size=(batch, heads, num_q, head_dim)).astype(dtype) for _ in range(2))
  k, v = (rng.normal(size=(batch, heads, num_k, head_dim)).astype(dtype) for _ in range(2))
  logits = (rng.normal(size=(batch, num_q, num_k)) - 1.0).astype(np.float32)
  logits[0, 0] = -np.abs(logits[0, 0]) - 0.1
  logits[:, 1:, block_k:2 * block_k] = -1.0
  key_valid = np.ones((batch, num_k), bool)
  if batch > 1:
    key_valid[1, num_k - num_k // 3:] = False
  return q, k, v, logits, key_valid, do


def _value_and_vjp(attention):
  """jit(out, (dq, dk, dv)) of `attention(q, k, v, logits, key_valid)` for cotangent do."""
  def run(q, k, v, logits, key_valid, do):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, logits, key_valid), q, k, v)
    return out, vjp(do)
  return jax.jit(run)


def _assert_close(got, want, tol):
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol)


@hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
@hypothesis.given(
    backend=st.sampled_from(cap.BACKENDS),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    num_q=st.integers(1, 40),
    num_k=st.integers(1, 160),
    head_dim=st.sampled_from([8, 16, 32]),
    block_q=st.sampled_from([8, 16]),
    block_k=st.sampled_from([16, 32]),
    k_splits=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float32(backend, batch, heads, num_q, num_k, head_dim, block_q,
                                   block_k, k_splits, seed):
  """Forward within 1e-5, dq/dk/dv within 1e-4, on ragged shapes with every mask case."""
  args = _inputs(np.random.default_rng(seed), batch, heads, num_q, num_k, head_dim,
                 block_k=block_k)
  got, got_grads = _value_and_vjp(lambda *a: cap.masked_cross_attention_pallas(
      *a, backend=backend, interpret=True, block_q=block_q, block_k=block_k,
      k_splits=k_splits, keys_minor=True))(*args)
  want, want_grads = _value_and_vjp(cross_attention_ref.masked_cross_attention_ref)(*args)
  assert got.dtype == jnp.float32
  _assert_close(got, want, 1e-5)
  for name, g, w in zip("qkv", got_grads, want_grads):
    assert np.isfinite(np.asarray(g)).all(), name
    _assert_close(g, w, 1e-4)


@pytest.mark.parametrize("backend", cap.BACKENDS)
def test_matches_reference_bfloat16(backend):
  """bfloat16 in and out: within 2e-2 of the output's scale (p is rounded for the PV matmul)."""
  args = _inputs(np.random.default_rng(1), 2, 2, 19, 150, 64, block_k=32)
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in args[:3]]
  got, got_grads = _value_and_vjp(lambda *a: cap.masked_cross_attention_pallas(
      *a, backend=backend, interpret=True, block_q=16, block_k=32, k_splits=2,
      keys_minor=True))(*bf16, *args[3:5], jnp.asarray(args[5], jnp.bfloat16))
  want, want_grads = _value_and_vjp(cross_attention_ref.masked_cross_attention_ref)(
      *(x.astype(jnp.float32) for x in bf16), *args[3:])
  assert got.dtype == jnp.bfloat16
  for g, w in [(got, want), *zip(got_grads, want_grads)]:
    scale = float(jnp.max(jnp.abs(w)))
    assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) <= 2e-2 * scale


def test_tpu_keys_major_layout_and_ragged_last_key_block():
  """The TPU kernels' [keys, head_dim] layout (head_dim 128's on a TPU, and every head_dim's
  when interpreted; the tests above force the [head_dim, keys] one); K = 150 leaves a ragged last key
  block of 22 keys, read past the end of k and v (NaN there in the TPU interpreter) and zeroed
  in the tile."""
  args = _inputs(np.random.default_rng(5), 2, 2, 9, 150, 128, block_k=32)
  interpret = pltpu.InterpretParams(uninitialized_memory="nan")
  got, got_grads = _value_and_vjp(lambda *a: cap.masked_cross_attention_pallas(
      *a, backend="tpu", interpret=interpret, block_q=16, block_k=128))(*args)
  want, want_grads = _value_and_vjp(cross_attention_ref.masked_cross_attention_ref)(*args)
  _assert_close(got, want, 1e-5)
  for g, w in zip(got_grads, want_grads):
    _assert_close(g, w, 1e-4)


@pytest.mark.parametrize("backend", cap.BACKENDS)
def test_skipped_tiles_are_never_read(backend):
  """NaN keys and values in tiles masked for every query do not reach the output.

  A masked but computed tile would turn them into NaN (0 * NaN in the PV product), so a finite
  output equal to the reference's on clean values shows the tiles were skipped.
  """
  q, k, v, logits, key_valid, do = _inputs(np.random.default_rng(2), 1, 2, 16, 128, 16,
                                           block_k=32)
  logits[:, :, 32:96] = -1.0  # tiles 1 and 2 of 4 (no empty row now: query 0 gets one key)
  logits[:, 0, 0] = 1.0
  k_nan, v_nan = k.copy(), v.copy()
  k_nan[..., 32:96, :] = np.nan
  v_nan[..., 32:96, :] = np.nan
  _, flags = cap.plan(jnp.asarray(logits), jnp.asarray(key_valid), 16, 16, 32)
  np.testing.assert_array_equal(np.asarray(flags), [[[1, 0, 0, 1]]])
  got, got_grads = _value_and_vjp(lambda *a: cap.masked_cross_attention_pallas(
      *a, backend=backend, interpret=True, block_q=16, block_k=32))(
          q, k_nan, v_nan, logits, key_valid, do)
  want, want_grads = _value_and_vjp(cross_attention_ref.masked_cross_attention_ref)(
      q, k, v, logits, key_valid, do)
  _assert_close(got, want, 1e-5)
  for g, w in zip(got_grads, want_grads):
    # dk, dv of the skipped keys are exactly 0, as the reference's.
    _assert_close(g, w, 1e-4)


@pytest.mark.parametrize("backend", cap.BACKENDS)
def test_nan_logits_follow_the_reference(backend):
  """A NaN logit allows nothing in a row with allowed keys, and changes nothing in an empty row
  (which takes every valid key, as the reference does)."""
  q, k, v, logits, key_valid, do = _inputs(np.random.default_rng(4), 1, 2, 8, 64, 16, block_k=32)
  logits[0, 1, 3] = np.nan  # query 1: other keys allowed
  logits[0, 2] = -1.0
  logits[0, 2, 40] = np.nan  # query 2: empty mask
  got, got_grads = _value_and_vjp(lambda *a: cap.masked_cross_attention_pallas(
      *a, backend=backend, interpret=True, block_q=8, block_k=32))(q, k, v, logits, key_valid, do)
  want, want_grads = _value_and_vjp(cross_attention_ref.masked_cross_attention_ref)(
      q, k, v, logits, key_valid, do)
  _assert_close(got, want, 1e-5)
  for g, w in zip(got_grads, want_grads):
    _assert_close(g, w, 1e-4)


def test_no_valid_key_gives_zeros_and_finite_grads():
  q, k, v, logits, key_valid, do = _inputs(np.random.default_rng(3), 2, 2, 5, 40, 8, block_k=16)
  key_valid[0] = False
  out, grads = _value_and_vjp(lambda *a: cap.masked_cross_attention_pallas(
      *a, interpret=True, block_q=8, block_k=16))(q, k, v, logits, key_valid, do)
  assert np.abs(np.asarray(out)[0]).max() == 0.0
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


def test_fetch_plan_refetches_nothing_for_skipped_steps():
  flags = jnp.asarray([[0, 0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 1]])
  np.testing.assert_array_equal(
      np.asarray(cross_attention_pallas_tpu.fetch_plan(flags)),
      [[2, 2, 2, 2, 4, 5, 5], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 6]])


def test_default_blocks_respect_the_hardware_tiling():
  mib = 2**20
  # v4 (16 MiB of VMEM, also the default off a TPU), v5p (64), v6e (128).
  assert cap.tpu_blocks(1, 4096, 8, 64, 2) == (16, 256)
  assert cap.tpu_blocks(1, 4096, 8, 64, 2, 64 * mib) == (16, 1024)
  assert cap.tpu_blocks(1, 200, 8, 64, 4, 128 * mib) == (16, 256)   # not beyond the keys
  # Two query tiles, not 128 + 128; block_k grows with the VMEM.
  assert [cap.tpu_blocks(130, 65536, 8, 256, 2, c * mib)[1] for c in (16, 64, 128)] == [
      128, 256, 512]
  assert cap.tpu_blocks(130, 65536, 8, 256, 2)[0] == 80
  assert cap.tpu_keys_minor(64) and not cap.tpu_keys_minor(256)
  # Interpreted (on the CPU), a transpose of K and V would be a copy.
  assert cap.default_keys_minor(64, False) and not cap.default_keys_minor(64, True)
  assert cap.gpu_blocks(1, 256) == (16, 32, 8)
  assert cap.gpu_blocks(300, 64) == (64, 128, 4)
  assert cap.gpu_k_splits(2, 8, 1, 512) == 16   # 16 programs -> 256
  assert cap.gpu_k_splits(2, 8, 1, 20) == 10    # 2 tiles per split rather than an empty split
  assert cap.gpu_k_splits(2, 8, 4, 3) == 3      # at most one split per key tile
  assert cap.gpu_k_splits(4, 8, 8, 64) == 1     # enough programs already


def _export(fn, platform, *args):
  return jax.export.export(
      jax.jit(fn), platforms=[platform],
      # A Triton call carries no serialization-stability guarantee; this checks lowering only.
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*args).mlir_module()


@pytest.mark.parametrize("backend,platform,target", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")])
@pytest.mark.parametrize("dtype,num_q,num_k,head_dim", [
    (jnp.float32, 100, 4000, 32),     # ragged Q and K, the mask decoder's head_dim
    (jnp.bfloat16, 1, 16384, 256),    # a single query, the largest head_dim
    (jnp.bfloat16, 130, 8192, 64),    # two query tiles
])
def test_kernels_lower_for_tpu_and_gpu(backend, platform, target, dtype, num_q, num_k,
                                       head_dim):
  """Forward: one kernel; gradient: forward, dq and dk/dv kernels, all through the real lowering."""
  spec = jax.ShapeDtypeStruct
  args = (spec((2, 8, num_q, head_dim), dtype), spec((2, 8, num_k, head_dim), dtype),
          spec((2, 8, num_k, head_dim), dtype), spec((2, num_q, num_k), jnp.float32),
          spec((2, num_k), jnp.bool_))

  def attention(q, k, v, logits, key_valid):
    return cap.masked_cross_attention_pallas(q, k, v, logits, key_valid, backend=backend,
                                             interpret=False)

  def loss(q, k, v, logits, key_valid):
    return jnp.sum(attention(q, k, v, logits, key_valid).astype(jnp.float32) ** 2)

  assert _export(attention, platform, *args).count(target) == 1
  assert _export(jax.grad(loss, argnums=(0, 1, 2)), platform, *args).count(target) == 3


def _temp_bytes(attention, num_q, num_k, heads=4, head_dim=32):
  """Compiled temp bytes of forward + backward (out and dq/dk/dv for a cotangent)."""
  spec = jax.ShapeDtypeStruct
  qs, ks = spec((1, heads, num_q, head_dim), jnp.float32), spec((1, heads, num_k, head_dim),
                                                                jnp.float32)
  args = (qs, ks, ks, spec((1, num_q, num_k), jnp.float32), spec((1, num_k), jnp.bool_), qs)
  return _value_and_vjp(attention).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly_in_keys_not_in_queries_times_keys():
  """Fit temp(Q, K) = a + b Q + c K + d Q K on a 2 x 2 grid; d is the per-(query, key) cost.

  The kernels are compiled with the TPU interpreter's callbacks (`pltpu.InterpretParams`), so
  the numbers are the XLA buffers around the kernels (padding, pre-pass, residuals, outputs):
  the plain interpreter would add copies of its operands that the real kernels do not make. The
  reference's scores and weights cost 4 bytes per (head, query, key) each, forward and backward.
  """
  def kernel(*a):
    return cap.masked_cross_attention_pallas(*a, backend="tpu", block_q=32, block_k=512,
                                             interpret=pltpu.InterpretParams())

  grid = [(64, 2048), (128, 2048), (64, 8192), (128, 8192)]
  temps = {name: [_temp_bytes(fn, q, k) for q, k in grid]
           for name, fn in [("kernel", kernel),
                            ("reference", cross_attention_ref.masked_cross_attention_ref)]}

  def per_query_key(t):
    return (t[3] - t[2] - t[1] + t[0]) / ((128 - 64) * (8192 - 2048))

  heads = 4
  assert per_query_key(temps["reference"]) >= 4 * heads      # at least one [H, Q, K] f32 array
  assert abs(per_query_key(temps["kernel"])) < 0.05          # none: linear in Q and in K
  # Doubling Q at the larger K: the reference's temp doubles, the kernel's stays nearly flat.
  assert temps["reference"][3] / temps["reference"][2] > 1.9
  assert temps["kernel"][3] / temps["kernel"][2] < 1.25
  # And the kernel's stays far below one [H, Q, K] float32 array.
  assert temps["kernel"][3] < 0.1 * heads * 128 * 8192 * 4


def test_entry_point_impls():
  args = tuple(map(jnp.asarray, _inputs(np.random.default_rng(4), 2, 2, 7, 40, 8,
                                        block_k=16)[:5]))
  want = cross_attention_ref.masked_cross_attention_ref(*args)
  pallas = jax.jit(lambda *a: cross_attention.fine_grained_cross_attention(*a, impl="pallas"))
  _assert_close(pallas(*args), want, 1e-5)
  # "auto" is the reference on the CPU.
  assert cross_attention.resolve_impl("auto") == "xla"


@pytest.fixture
def fast_compile():
  """The tiny model's forward + backward compiles in ~15 s instead of ~40 s without XLA's
  optimisation passes; both implementations are compiled alike."""
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.mark.slow
def test_tiny_model_same_loss_and_gradients(fast_compile):
  """UniRES++ tiny: loss within 1e-5 relative, every gradient within 1e-4 of its leaf's scale.

  The mask decoder keeps its three layers (each layer's attention mask is the previous layer's
  prediction); the backbones, which only feed it, are one layer deep: two compiles instead of
  two of the whole tiny model."""
  configs = {impl: load_config("tiny") for impl in ("xla", "pallas")}
  for impl, config in configs.items():
    config.model.mask_decoder.cross_attention_impl = impl
    config.model.vision.num_layers = 2  # the penultimate layer's output: one layer runs
    config.model.llm.num_layers = 1
    config.model.convnext.depths = (1, 1, 1, 1)
  model_xla = models.build_model(configs["xla"], nnx.Rngs(0))
  # The same parameters in the "pallas" model (the same init, without running it a second time).
  abstract = nnx.eval_shape(lambda: models.build_model(configs["pallas"], nnx.Rngs(0)))
  model_pallas = nnx.merge(nnx.graphdef(abstract), nnx.state(model_xla))
  batch = jax.tree.map(jnp.asarray, synthetic_batch(configs["xla"].model, 2, seed=0))

  def loss_and_grads(model, config):
    def loss_fn(model):
      total, _ = compute_loss(model(batch), batch, config.model.loss,
                              config.model.mask_decoder.aux_loss)
      return total
    return nnx.jit(nnx.value_and_grad(loss_fn))(model)

  loss_xla, grads_xla = loss_and_grads(model_xla, configs["xla"])
  loss_pallas, grads_pallas = loss_and_grads(model_pallas, configs["pallas"])
  assert abs(float(loss_pallas) - float(loss_xla)) <= 1e-5 * abs(float(loss_xla))
  leaves = jax.tree_util.tree_leaves_with_path(grads_xla)
  assert len(leaves) == len(jax.tree.leaves(grads_pallas))
  for (path, want), got in zip(leaves, jax.tree.leaves(grads_pallas)):
    # Key-projection biases have an exact zero gradient (softmax is shift-invariant): the 1e-6
    # floor absorbs their float32 noise (~1e-8) on both sides.
    tol = 1e-4 * float(jnp.max(jnp.abs(want))) + 1e-6
    assert float(jnp.max(jnp.abs(got - want))) <= tol, jax.tree_util.keystr(path)
