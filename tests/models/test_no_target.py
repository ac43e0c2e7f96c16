"""The no-target head: its formula with and without valid proposals, and its loss's null class."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unires_jax.models import losses
from unires_jax.models.no_target import INVALID_LOGIT, NoTargetHead, evidence


def _head_and_inputs(valid):
  head = NoTargetHead(16, 8, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  seg = jnp.asarray(rng.normal(size=(len(valid), 16)), jnp.float32)
  regions = jnp.asarray(rng.normal(size=(len(valid), len(valid[0]), 16)), jnp.float32)
  return head, seg, regions, jnp.asarray(valid)


def _prior(head, seg):
  return np.asarray(head.fc2(jax.nn.gelu(head.fc1(seg), approximate=False))[..., 0])


def test_logit_is_prior_minus_logsumexp_of_the_valid_matches():
  head, seg, regions, valid = _head_and_inputs([[True, True, False], [True, False, False]])
  logits, match = head(seg, regions, valid)
  match = np.asarray(match)
  assert np.all(match[~np.asarray(valid)] == INVALID_LOGIT)
  want = [_prior(head, seg)[b] - np.log(np.sum(np.exp(match[b][np.asarray(valid)[b]])))
          for b in range(2)]
  np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=1e-5)


def test_without_a_valid_proposal_the_logit_is_the_text_prior():
  """The old rule gave prior - logsumexp(INVALID_LOGIT x 3) ~ +1e4: "no target" by construction."""
  head, seg, regions, valid = _head_and_inputs([[False, False, False], [True, False, True]])
  logits, match = head(seg, regions, valid)
  logits = np.asarray(logits)
  assert np.all(np.isfinite(logits))
  assert logits[0] == _prior(head, seg)[0]
  assert abs(logits[0]) < 1e3
  # The row with proposals still subtracts their evidence.
  m = np.asarray(match)[1, [0, 2]]
  np.testing.assert_allclose(logits[1], _prior(head, seg)[1] - np.log(np.exp(m).sum()),
                             rtol=0, atol=1e-5)


def test_evidence_is_zero_only_for_rows_without_a_valid_slot():
  match = jnp.asarray([[INVALID_LOGIT] * 3, [-2.0, INVALID_LOGIT, INVALID_LOGIT],
                       [0.5, 1.5, -3.0]], jnp.float32)
  got = np.asarray(evidence(match))
  np.testing.assert_allclose(got, [0.0, -2.0, np.log(np.exp([0.5, 1.5, -3.0]).sum())],
                             rtol=1e-6, atol=0)


def test_gradients_are_finite_without_a_valid_proposal():
  head, seg, regions, valid = _head_and_inputs([[False, False, False]])
  grads = nnx.grad(lambda h: jnp.sum(h(seg, regions, valid)[0]))(head)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("no_target", [True, False])
def test_region_loss_of_a_row_without_proposals_is_zero(no_target):
  """The null class is the only real class: probability 1, as the head's evidence of 0 says.
  (A target row without a valid proposal has no marked proposal and does not count at all.)"""
  match = jnp.full((1, 4), INVALID_LOGIT, jnp.float32)
  for prior in (-3.0, 0.0, 2.5):
    loss = losses.region_selection_ce(match, jnp.asarray([prior], jnp.float32),
                                      jnp.zeros((1, 4), jnp.float32), jnp.asarray([no_target]))
    assert float(loss) == 0.0
