"""Per-tile math of the masked cross-attention kernels, shared by the TPU and GPU variants.

Everything here works on values already loaded from a kernel's refs: one query tile
`[block_q, ...]` against one key tile `[block_k, ...]` of one head. Per-query quantities (running
max, running sum, logsumexp, threshold) are `[block_q, 1]` columns so that they broadcast against
`[block_q, block_k]` scores on both lowerings. Scores and softmax are float32 whatever the input
dtype, as in the reference.

Key and value tiles come in one of two layouts (`keys_minor`, static): `[block_k, head_dim]`
(keys major, the GPU's and the TPU's for head_dim a multiple of 128) or `[head_dim, block_k]`
(keys minor, the TPU's for smaller head_dim: keys fill the 128 lanes, where head_dim 32 or 64
would leave three or two quarters of every vreg and VMEM tile empty; it is also the layout XLA:TPU
gives a [..., keys, head_dim] array by default, so the kernel reads it without a relayout).
"""

import jax
import jax.numpy as jnp


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [m, d] x b [n, d] -> [m, n] float32: contract the last dims (no transpose in memory)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [m, d] x b [m, n] -> [d, n] float32: contract the first dims (a.T @ b)."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def allowed(logits: jax.Array, threshold: jax.Array, key_valid: jax.Array) -> jax.Array:
  """The attention mask of a tile, from the logits (never stored as a [Q, K] array).

  Args:
    logits: [block_q, block_k] mask logits.
    threshold: [block_q, 1] per-query threshold from the pre-pass: 0 (Mask2Former's rule),
      -inf for a query whose mask is empty (attend to every valid key), +inf for padding queries.
    key_valid: [block_q, block_k] bool (or broadcastable), False for padding keys.

  Returns:
    [block_q, block_k] bool. An empty-mask query takes every valid key whatever its logit (a NaN
    logit included), as the reference does.
  """
  return jnp.logical_and(jnp.logical_or(logits >= threshold, threshold == -jnp.inf), key_valid)


def scores(q: jax.Array, k: jax.Array, scale: float, keys_minor: bool = False) -> jax.Array:
  """q [block_q, head_dim] . k -> [block_q, block_k] float32, scaled.

  k is [block_k, head_dim], or [head_dim, block_k] when keys_minor.
  """
  if keys_minor:
    return scale * jax.lax.dot(q, k, preferred_element_type=jnp.float32)
  return scale * dot_nt(q, k)


def weighted_values(p: jax.Array, v: jax.Array, keys_minor: bool = False) -> jax.Array:
  """p [block_q, block_k] (cast to v's dtype) @ v -> [block_q, head_dim] float32.

  v is [block_k, head_dim], or [head_dim, block_k] when keys_minor. Also dq's ds @ k.
  """
  if keys_minor:
    return dot_nt(p.astype(v.dtype), v)
  return jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def key_grad(w: jax.Array, x: jax.Array, keys_minor: bool = False) -> jax.Array:
  """w.T @ x for w [block_q, block_k] (cast to x's dtype), x [block_q, head_dim]: float32.

  [block_k, head_dim], or [head_dim, block_k] (the same transposed) when keys_minor: dv from
  (p, do), dk from (ds, q), in the layout of the key tiles.
  """
  if keys_minor:
    return dot_tn(x, w.astype(x.dtype))
  return jax.lax.dot(w.T.astype(x.dtype), x, preferred_element_type=jnp.float32)


def online_softmax_step(s, mask, m_prev, l_prev, acc_prev, v, keys_minor=False):
  """One key tile of the flash-attention recurrence.

  Args:
    s: [block_q, block_k] float32 scores.
    mask: [block_q, block_k] bool, from `allowed`.
    m_prev, l_prev: [block_q, 1] float32 running max (-inf before any allowed key) and sum.
    acc_prev: [block_q, head_dim] float32 running sum of weights * values.
    v: [block_k, head_dim] values, or [head_dim, block_k] when keys_minor.

  Returns:
    (m, l, acc) updated with this tile.
  """
  s = jnp.where(mask, s, -jnp.inf)
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  # A row with no allowed key so far keeps m = -inf; shifting it by 0 instead keeps exp() free of
  # inf - inf, and its weights are exp(-inf) = 0 anyway.
  shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  p = jnp.exp(s - shift)
  alpha = jnp.exp(m_prev - shift)
  l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  return m_next, l_next, alpha * acc_prev + weighted_values(p, v, keys_minor)


def finalize(m, l, acc):
  """(m, l [block_q, 1], acc [block_q, head_dim]) -> (output float32, logsumexp [block_q, 1]).

  A row without any allowed key (padding queries, or a batch row without a valid key) has l = 0:
  its output is 0 as in the reference and its logsumexp -inf, which gives it zero weight where
  partial results are merged and is never subtracted from an allowed score in the backward pass.
  """
  nonempty = l > 0
  l_safe = jnp.where(nonempty, l, 1.0)
  lse = jnp.where(nonempty, m + jnp.log(l_safe), -jnp.inf)
  return acc / l_safe, lse


def probabilities(s, mask, lse):
  """Softmax weights recomputed from the saved logsumexp: [block_q, block_k] float32.

  Masking before exp keeps rows with lse = -inf at 0 instead of exp(-inf + inf) = nan.
  """
  return jnp.exp(jnp.where(mask, s - lse, -jnp.inf))


def score_grad(p, dp, delta):
  """d(loss)/d(scores) = p * (dp - delta), delta [block_q, 1] = rowsum(out * d_out)."""
  return p * (dp - delta)
