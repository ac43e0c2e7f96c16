"""Masked cross-attention reference against torch SDPA, and the rule's edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unires_jax.kernels import cross_attention
from unires_jax.kernels import cross_attention_ref

B, H, Q, K, D = 2, 3, 5, 24, 8


def _inputs(seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(B, H, n, D)).astype(dtype) for n in (Q, K, K))
  logits = rng.normal(size=(B, Q, K)).astype(np.float32)
  logits[0, 1] = -np.abs(logits[0, 1]) - 0.1  # an empty row: falls back to all valid keys
  logits[1, 2, :3] = 0.0                      # the boundary: logit 0 is allowed
  logits[1, 2, 3:] = -1.0
  key_valid = np.ones((B, K), bool)
  key_valid[1, -7:] = False                   # padding at the end of the second row
  key_valid[0, 4] = False
  return q, k, v, logits, key_valid


def _allowed_numpy(logits, key_valid):
  """The rule written out per query, independently of the implementation."""
  allowed = np.zeros(logits.shape, bool)
  for b in range(logits.shape[0]):
    for i in range(logits.shape[1]):
      row = (logits[b, i] >= 0) & key_valid[b]
      allowed[b, i] = row if row.any() else key_valid[b]
  return allowed


def _torch_sdpa(q, k, v, allowed):
  return torch.nn.functional.scaled_dot_product_attention(
      torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
      attn_mask=torch.from_numpy(allowed)[:, None]).numpy()


def test_matches_torch_sdpa():
  q, k, v, logits, key_valid = _inputs(0)
  got = cross_attention_ref.masked_cross_attention_ref(
      *map(jnp.asarray, (q, k, v, logits, key_valid)))
  want = _torch_sdpa(q, k, v, _allowed_numpy(logits, key_valid))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_no_key_valid_means_all_valid():
  q, k, v, logits, _ = _inputs(1)
  got = cross_attention_ref.masked_cross_attention_ref(*map(jnp.asarray, (q, k, v, logits)))
  want = _torch_sdpa(q, k, v, _allowed_numpy(logits, np.ones((B, K), bool)))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_boundary_logit_zero_is_allowed():
  q, k, v, logits, key_valid = _inputs(2)
  logits[1, 0] = -1.0
  logits[1, 0, 5] = 0.0  # the only allowed key: the output is its value, in every head
  got = cross_attention_ref.masked_cross_attention_ref(
      *map(jnp.asarray, (q, k, v, logits, key_valid)))
  np.testing.assert_allclose(np.asarray(got)[1, :, 0], v[1, :, 5], atol=1e-6, rtol=0)


def test_empty_row_equals_unmasked_attention_over_valid_keys():
  q, k, v, logits, key_valid = _inputs(3)
  args = tuple(map(jnp.asarray, (q, k, v)))
  empty = cross_attention_ref.masked_cross_attention_ref(
      *args, jnp.full((B, Q, K), -3.0), jnp.asarray(key_valid))
  unmasked = cross_attention_ref.masked_cross_attention_ref(
      *args, jnp.ones((B, Q, K)), jnp.asarray(key_valid))
  np.testing.assert_allclose(np.asarray(empty), np.asarray(unmasked), atol=1e-6, rtol=0)
  # And that is attention over the valid keys only.
  want = _torch_sdpa(q, k, v, np.broadcast_to(key_valid[:, None], (B, Q, K)).copy())
  np.testing.assert_allclose(np.asarray(empty), want, atol=1e-5, rtol=0)


def test_padded_keys_get_zero_weight():
  q, k, v, logits, key_valid = _inputs(4)
  logits[:, :, ~key_valid[1]] = 5.0  # even a large positive logit on padding is ignored
  base = cross_attention_ref.masked_cross_attention_ref(
      *map(jnp.asarray, (q, k, v, logits, key_valid)))
  pad = ~key_valid[:, None, :, None]
  k2 = np.where(pad, 1e3, k).astype(np.float32)
  v2 = np.where(pad, -1e3, v).astype(np.float32)
  changed = cross_attention_ref.masked_cross_attention_ref(
      *map(jnp.asarray, (q, k2, v2, logits, key_valid)))
  np.testing.assert_array_equal(np.asarray(changed), np.asarray(base))


def test_no_valid_key_gives_zeros_and_finite_grads():
  q, k, v, logits, key_valid = _inputs(5)
  key_valid[0] = False
  args = tuple(map(jnp.asarray, (q, k, v, logits, key_valid)))
  out = cross_attention_ref.masked_cross_attention_ref(*args)
  assert np.abs(np.asarray(out)[0]).max() == 0.0
  grads = jax.grad(
      lambda q, k, v: cross_attention_ref.masked_cross_attention_ref(
          q, k, v, *args[3:]).sum(), argnums=(0, 1, 2))(*args[:3])
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


def test_bfloat16_accumulates_in_float32():
  q, k, v, logits, key_valid = _inputs(6)
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  got = cross_attention_ref.masked_cross_attention_ref(
      *bf16, jnp.asarray(logits), jnp.asarray(key_valid))
  assert got.dtype == jnp.bfloat16
  # Same computation in float32 on the bf16-rounded inputs: only the output cast differs,
  # i.e. at most half a bfloat16 ulp (2^-8 relative).
  rounded = cross_attention_ref.masked_cross_attention_ref(
      *(x.astype(jnp.float32) for x in bf16), jnp.asarray(logits), jnp.asarray(key_valid))
  err = np.abs(np.asarray(got, np.float32) - np.asarray(rounded))
  assert (err <= 2.0**-8 * np.abs(np.asarray(rounded)) + 1e-7).all(), err.max()
  # Against the float32 inputs the input rounding (2^-9 relative per element) adds up to 2e-2.
  full = cross_attention_ref.masked_cross_attention_ref(
      *map(jnp.asarray, (q, k, v, logits, key_valid)))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(full), atol=2e-2, rtol=0)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_entry_point_is_the_reference(impl):
  args = tuple(map(jnp.asarray, _inputs(7)))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda *a: cross_attention.fine_grained_cross_attention(
          *a, impl=impl))(*args)),
      np.asarray(jax.jit(cross_attention_ref.masked_cross_attention_ref)(*args)))


def test_entry_point_rejects_unknown_impl():
  with pytest.raises(ValueError, match="'xla', 'pallas', 'auto'"):
    cross_attention.fine_grained_cross_attention(
        *map(jnp.asarray, _inputs(8)), impl="cuda")
