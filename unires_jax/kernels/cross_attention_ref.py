"""Reference (plain XLA) fine-grained masked cross-attention: the specification kernels match."""

import jax
import jax.numpy as jnp


def allowed_keys(mask_logits: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
  """Which keys each query attends to, by Mask2Former's rule.

  Args:
    mask_logits: [batch, queries, keys] mask logits of each query at each key position.
    key_valid: [batch, keys] bool, False for padding keys; None means every key is valid.

  Returns:
    [batch, queries, keys] bool: (logit >= 0, i.e. sigmoid >= 0.5) and the key is valid; a query
    for which that set is empty gets every valid key instead.
  """
  if key_valid is None:
    key_valid = jnp.ones((mask_logits.shape[0], mask_logits.shape[2]), bool)
  valid = key_valid.astype(bool)[:, None, :]
  allowed = (mask_logits >= 0) & valid
  empty = ~allowed.any(axis=-1, keepdims=True)
  return jnp.where(empty, valid, allowed)


def checked_args(q, k, v, mask_logits, key_valid, scale) -> tuple[jax.Array, float]:
  """Checks the shapes and fills in the defaults, alike for the reference and the kernels.

  Raises a ValueError naming the argument whose shape does not fit `q [b, h, Q, D]`.

  Returns:
    key_valid: [batch, keys] bool, all True for None.
    scale: as given, or 1 / sqrt(head_dim) for None.
  """
  batch, heads, num_q, head_dim = q.shape
  num_k = k.shape[2]
  if k.shape != (batch, heads, num_k, head_dim) or v.shape != k.shape:
    raise ValueError(f"k and v must be [batch, heads, keys, head_dim] matching q {q.shape}, "
                     f"got {k.shape} and {v.shape}")
  if mask_logits.shape != (batch, num_q, num_k):
    raise ValueError(f"mask_logits must be [batch, queries, keys] = {(batch, num_q, num_k)}, "
                     f"got {mask_logits.shape}")
  if key_valid is not None and key_valid.shape != (batch, num_k):
    raise ValueError(f"key_valid must be [batch, keys] = {(batch, num_k)}, got {key_valid.shape}")
  if key_valid is None:
    key_valid = jnp.ones((batch, num_k), bool)
  return key_valid.astype(bool), head_dim**-0.5 if scale is None else scale


def masked_cross_attention_ref(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask_logits: jax.Array,
    key_valid: jax.Array | None = None,
    *,
    scale: float | None = None,
) -> jax.Array:
  """Multi-head attention of a few queries to many keys under a per-query binary mask.

  The rule, exactly (a kernel must implement this, not an approximation of it):
    * Query i may attend to key j iff `mask_logits[b, i, j] >= 0` (sigmoid(logit) >= 0.5, the
      boundary logit 0 included, decided on the logit so no sigmoid rounding enters) and
      `key_valid[b, j]`. The mask is shared by all heads and carries no gradient.
    * A query with no allowed key attends to every valid key (Mask2Former's fallback, so that a
      query whose predicted mask vanished still sees the image).
    * Padding keys (`key_valid` False) never get weight, whatever their values, under either rule.
      A batch row with no valid key at all outputs zeros.
    * scores = scale * (q . k) accumulated in float32 (scale defaults to 1/sqrt(head_dim));
      softmax over the allowed keys in float32; output = sum of weights * v in float32, cast to
      q's dtype. This holds whatever the input dtype (bfloat16 inputs are not rounded further).

  Args:
    q: [batch, heads, queries, head_dim].
    k: [batch, heads, keys, head_dim].
    v: [batch, heads, keys, head_dim].
    mask_logits: [batch, queries, keys] mask logits.
    key_valid: [batch, keys] bool, or None when no key is padding.
    scale: score scale; None means 1 / sqrt(head_dim).

  Returns:
    [batch, heads, queries, head_dim] in q's dtype.
  """
  key_valid, scale = checked_args(q, k, v, mask_logits, key_valid, scale)
  allowed = jax.lax.stop_gradient(allowed_keys(mask_logits, key_valid))[:, None]  # [b, 1, q, k]

  scores = scale * jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  # Masking before exp keeps gradients finite: masked entries are exp(-inf) = 0 both ways.
  row_max = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.exp(jnp.where(allowed, scores - row_max, -jnp.inf))
  denom = weights.sum(axis=-1, keepdims=True)
  weights = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, v.astype(jnp.float32))
  return out.astype(q.dtype)
