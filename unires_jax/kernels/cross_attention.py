"""The one entry point for fine-grained masked cross-attention, choosing an implementation.

Models call only `fine_grained_cross_attention`; the implementation is a config string
(`config.model.mask_decoder.cross_attention_impl`). Until the Pallas kernel lands, "auto" is the
XLA reference on every platform.
"""

import jax

from unires_jax.kernels import cross_attention_ref

IMPLEMENTATIONS = ("xla", "auto")


def fine_grained_cross_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask_logits: jax.Array,
    key_valid: jax.Array | None = None,
    *,
    impl: str = "xla",
) -> jax.Array:
  """Masked multi-head cross-attention; see `cross_attention_ref.masked_cross_attention_ref`.

  Args:
    q: [batch, heads, queries, head_dim].
    k: [batch, heads, keys, head_dim].
    v: [batch, heads, keys, head_dim].
    mask_logits: [batch, queries, keys]; query i attends to key j where the logit is >= 0.
    key_valid: [batch, keys] bool (False = padding), or None.
    impl: "xla" (the reference) or "auto" (the best available on the platform).

  Returns:
    [batch, heads, queries, head_dim] in q's dtype.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown cross-attention impl {impl!r}; options: {IMPLEMENTATIONS}")
  return cross_attention_ref.masked_cross_attention_ref(q, k, v, mask_logits, key_valid)
