"""The one entry point for fine-grained masked cross-attention, choosing an implementation.

Models call only `fine_grained_cross_attention`; the implementation is a config string
(`config.model.mask_decoder.cross_attention_impl`):
  "xla":    the reference (`cross_attention_ref`), plain XLA; materialises [heads, queries, keys]
            scores.
  "pallas": the Pallas kernels (`cross_attention_pallas`): Mosaic on TPU, Triton on GPU, and the
            Pallas interpreter on the CPU (slow; for tests).
  "auto":   the kernels on TPU and GPU, the reference on the CPU.
"""

import jax

from unires_jax.kernels import cross_attention_pallas
from unires_jax.kernels import cross_attention_ref

IMPLEMENTATIONS = ("xla", "pallas", "auto")


def resolve_impl(impl: str) -> str:
  """"auto" -> "pallas" on TPU and GPU, "xla" elsewhere; other names are returned checked."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown cross-attention impl {impl!r}; options: {IMPLEMENTATIONS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
  return impl


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
    impl: "xla" (the reference), "pallas" (the kernels; interpreted on the CPU) or "auto" (the
      kernels on TPU and GPU, the reference on the CPU).

  Returns:
    [batch, heads, queries, head_dim] in q's dtype.
  """
  if resolve_impl(impl) == "pallas":
    return cross_attention_pallas.masked_cross_attention_pallas(q, k, v, mask_logits, key_valid)
  return cross_attention_ref.masked_cross_attention_ref(q, k, v, mask_logits, key_valid)
