"""The region losses on crafted cases, against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unires_jax.models import losses


def test_region_targets_marks_boxes_the_mask_covers():
  mask = np.zeros((1, 8, 8), np.float32)
  mask[0, 0:4, 0:4] = 1  # the target: the top-left 4x4 square
  boxes = np.array([[
      [0, 0, 4, 4],      # the target's box: covered 16/16
      [0, 0, 8, 8],      # the whole image: 16/64 = 1/4
      [2, 2, 6, 6],      # overlaps a corner: 4/16 = 1/4
      [2.6, 2.6, 6, 6],  # pixel centres 3.5 .. 5.5: 1/9 covered
      [4, 4, 8, 8],      # outside the target
      [1, 1, 1.2, 1.2],  # no pixel centre inside
      [0, 0, 4, 4],      # covered, but not a valid proposal
  ]], np.float32)
  valid = np.array([[True] * 6 + [False]])
  got = losses.region_targets(mask, boxes, valid, min_coverage=0.25)
  np.testing.assert_array_equal(np.asarray(got), [[1, 1, 1, 0, 0, 0, 0]])
  got = losses.region_targets(mask, boxes, valid, min_coverage=0.5)
  np.testing.assert_array_equal(np.asarray(got), [[1, 0, 0, 0, 0, 0, 0]])


def test_region_selection_ce_by_hand():
  match = np.array([[1.0, -1.0, -1e4], [0.5, 2.0, 0.0], [3.0, 0.0, 0.0]], np.float32)
  no_target_logits = np.array([0.2, -1.0, 1.0], np.float32)
  targets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32)
  no_target = np.array([False, False, True])

  def log_probs(row):  # classes: the proposals, then null
    lse = math.log(sum(math.exp(v) for v in match[row]))
    logits = list(match[row]) + [no_target_logits[row] + lse]
    z = math.log(sum(math.exp(v) for v in logits))
    return [v - z for v in logits]

  want = np.mean([-log_probs(0)[0],
                  -(log_probs(1)[0] + log_probs(1)[1]) / 2,
                  -log_probs(2)[3]])
  got = losses.region_selection_ce(match, no_target_logits, targets, no_target)
  assert float(got) == pytest.approx(want, rel=1e-6)
  # The null class's log-odds against all proposals together is the no-target logit.
  lp = log_probs(1)
  assert lp[3] - math.log(sum(math.exp(v) for v in lp[:3])) == pytest.approx(-1.0, abs=1e-6)


def test_region_selection_ce_skips_targets_without_a_marked_proposal():
  match = np.zeros((2, 2), np.float32)
  no_target_logits = np.zeros(2, np.float32)
  targets = np.array([[0, 0], [0, 1]], np.float32)
  no_target = np.array([False, False])
  got = losses.region_selection_ce(match, no_target_logits, targets, no_target)
  # Row 1 only: logits (0, 0, null = log 2), so the marked proposal has probability 1/4.
  assert float(got) == pytest.approx(math.log(4), rel=1e-6)
  assert float(losses.region_selection_ce(
      match, no_target_logits, np.zeros_like(targets), no_target)) == 0.0


def test_prior_adjustment_moves_the_optimum_to_balanced_classes():
  # 1 of 8 expressions has no target. Without the adjustment the constant logit that minimises
  # the BCE is the data's log-odds, log(1/7); with it the model's own logit is 0 (p = 0.5).
  labels = np.array([1, 0, 0, 0, 0, 0, 0, 0], bool)

  def grad_at(logit, prior):
    loss = lambda x: losses.no_target_bce(
        losses.prior_adjusted_logits(jnp.full((8,), x), prior), labels)
    return float(jax.grad(loss)(jnp.float32(logit)))

  assert abs(grad_at(math.log(1 / 7), 0.5)) < 1e-6
  assert abs(grad_at(0.0, 0.5)) > 0.1
  assert abs(grad_at(0.0, 1 / 8)) < 1e-6
  np.testing.assert_allclose(
      np.asarray(losses.prior_adjusted_logits(jnp.array([-1.0, 2.0]), 0.2)),
      [-1.0 - math.log(4), 2.0 - math.log(4)], rtol=1e-6)


@pytest.mark.parametrize("prior", [0.0, 1.0, -0.1, 1.5])
def test_prior_outside_the_open_interval_is_rejected(prior):
  with pytest.raises(ValueError, match="loss.no_target_prior"):
    losses.prior_adjusted_logits(jnp.zeros((2,)), prior)


def test_answer_positions_are_those_followed_by_a_target():
  loss_mask = np.array([[0, 0, 1, 1, 0, 0],
                        [0, 0, 0, 1, 1, 1],
                        [0, 0, 0, 0, 0, 0]])
  positions = np.asarray(losses.answer_positions(jnp.asarray(loss_mask), 4))
  assert positions.tolist() == [[1, 2, 5, 5], [2, 3, 4, 5], [5, 5, 5, 5]]
  # Logits at those positions give the loss of logits at every position.
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 7, loss_mask.shape))
  everywhere = jnp.asarray(rng.normal(size=(*loss_mask.shape, 7)), jnp.float32)
  at = jnp.take_along_axis(everywhere, jnp.asarray(positions)[..., None], axis=1)
  all_positions = jnp.broadcast_to(jnp.arange(6), loss_mask.shape)
  want = losses.lm_cross_entropy(everywhere, all_positions, ids, jnp.asarray(loss_mask))
  got = losses.lm_cross_entropy(at, jnp.asarray(positions), ids, jnp.asarray(loss_mask))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # By hand: the mean cross-entropy of the 5 target tokens.
  logp = jax.nn.log_softmax(everywhere, axis=-1)
  targets = [(0, 1), (0, 2), (1, 2), (1, 3), (1, 4)]
  by_hand = -np.mean([logp[r, p, ids[r, p + 1]] for r, p in targets])
  np.testing.assert_allclose(want, by_hand, rtol=1e-6)
