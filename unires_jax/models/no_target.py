"""The no-target head: does any object / part proposal match the expression?

The head compares the expression (the LLM's [SEG] state `q`) with every proposal (its projected
region feature `r`, the vector that replaces its `<obj_patch>` / `<part_patch>` placeholder) and
weighs the evidence against a prior that depends on the text alone:

  match_r          = fc2(gelu(fc1(gelu(Q q * R r + Q q + R r))))     per valid proposal r
  evidence         = logsumexp_r match_r over the valid proposals, 0 when there is none
  no_target_logit  = prior(q) - evidence                             prior = MLP(q)

The product `Q q * R r` lets one hidden unit fire only when the text asks for an attribute that
the region has (colour AND kind), which a dot product of `q` and `r` cannot express. Read as a
classifier over "proposal 1 .. proposal n or none", the logits are `[match_1 .. match_n, null]`
with `null = no_target_logit + evidence`, so that
`no_target_logit = log P(none) - log P(some proposal)`; `losses.region_selection_ce` trains it
that way, and `losses.no_target_bce` on `no_target_logit` as before.

Zero valid proposals (a detector that found nothing, a dataset without proposals): the
logsumexp over the padded slots alone would be about INVALID_LOGIT, making the logit about
-INVALID_LOGIT = +1e4, "no target" for every expression by construction, whatever the text says.
Instead the evidence of an empty set of proposals is 0, so the logit is the text prior alone: the
head's estimate from the expression when the image offers no region to compare with. (0 is the
evidence of one proposal whose match logit is 0; in the classifier reading, null = prior against
no proposal class, so `region_selection_ce` gives such a row no loss, as it gave before.) With
at least one valid proposal nothing changes: padded slots add exp(INVALID_LOGIT) = 0 to the sum.

A plain MLP of the [SEG] state (the design's first version) learns only the language prior on
ShapesParts: its score was the same for a phrasing whether or not the image held the referent
(README, demo status).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unires_jax.models import layers

INVALID_LOGIT = -1e4  # match logit of padded proposals: exp() of it is 0 in float32


def evidence(match_logits: jax.Array) -> jax.Array:
  """`[batch, regions]` match logits (INVALID_LOGIT where padded) -> `[batch]` float32: their
  logsumexp over the valid proposals, 0 for a row without one (see the module doc). A slot is
  valid when its logit is above INVALID_LOGIT / 2: the head writes INVALID_LOGIT in every padded
  slot, and the margin keeps that true after a round trip through bfloat16 (-1e4 -> -9984)."""
  match_logits = match_logits.astype(jnp.float32)
  any_valid = jnp.any(match_logits > 0.5 * INVALID_LOGIT, axis=-1)
  return jnp.where(any_valid, jax.nn.logsumexp(match_logits, axis=-1), 0.0)


class NoTargetHead(nnx.Module):
  """`no_target_logit = prior([SEG]) - evidence(match([SEG], regions))`; see the module doc."""

  def __init__(self, in_features: int, hidden: int, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The text prior (fc1 / fc2) keeps the names of the MLP head it extends.
    self.fc1 = layers.linear(in_features, hidden, ("embed", "mlp"), **kw)
    self.fc2 = layers.linear(hidden, 1, ("mlp", None), **kw)
    self.query = layers.linear(in_features, hidden, ("embed", "mlp"), **kw)
    self.region = layers.linear(in_features, hidden, ("embed", "mlp"), **kw)
    self.match_fc1 = layers.linear(hidden, hidden, ("mlp", "embed"), **kw)
    self.match_fc2 = layers.linear(hidden, 1, ("embed", None), **kw)

  def __call__(self, seg_state: jax.Array, regions: jax.Array,
               region_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scores the expression against the proposals.

    Args:
      seg_state: `[batch, width]` LLM hidden state of the [SEG] token.
      regions: `[batch, regions, width]` projected object and part features.
      region_valid: `[batch, regions]` bool, proposal present.

    Returns:
      (no_target_logits `[batch]`, match_logits `[batch, regions]`, INVALID_LOGIT where padded).
    """
    q = self.query(seg_state)[:, None]
    r = self.region(regions)
    hidden = jax.nn.gelu(self.match_fc1(jax.nn.gelu(q * r + q + r, approximate=False)),
                         approximate=False)
    match = jnp.where(region_valid, self.match_fc2(hidden)[..., 0].astype(jnp.float32),
                      INVALID_LOGIT)
    prior = self.fc2(jax.nn.gelu(self.fc1(seg_state), approximate=False))[..., 0]
    return prior.astype(jnp.float32) - evidence(match), match
