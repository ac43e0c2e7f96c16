"""UniRES++ losses: LM cross-entropy on answer tokens, mask BCE + Dice, no-target BCE, and which
proposal the expression selects (or none)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unires_jax.models.no_target import evidence


def answer_positions(loss_mask: jax.Array, count: int) -> jax.Array:
  """The positions whose next-token logits the LM loss reads: those followed by a target token.

  Args:
    loss_mask: `[batch, tokens]`, 1 where the token is a target (the answer tokens).
    count: positions per row (`config.model.max_answer_tokens`); rows with fewer targets are
      filled with the last position, which predicts nothing and gets no weight. A row with more
      would lose its later targets: `preprocess` refuses answers longer than `count`.

  Returns:
    `[batch, count]` int32, increasing along each row.
  """
  tokens = loss_mask.shape[1]
  follows_target = loss_mask[:, 1:].astype(bool)
  return jax.vmap(lambda row: jnp.nonzero(row, size=count, fill_value=tokens - 1)[0])(
      follows_target).astype(jnp.int32)


def lm_cross_entropy(logits: jax.Array, positions: jax.Array, input_ids: jax.Array,
                     loss_mask: jax.Array) -> jax.Array:
  """Next-token cross-entropy averaged over the target tokens.

  Args:
    logits: `[batch, n, vocab]`, the LM logits at `positions` (position t predicts token t + 1).
    positions: `[batch, n]` int, which positions `logits` holds: every position
      (`arange(tokens)`) or `answer_positions(loss_mask, n)`; the loss is the same.
    input_ids: `[batch, tokens]`.
    loss_mask: `[batch, tokens]`, 1 where the token is a target (the answer tokens).

  Returns:
    Scalar mean over target tokens (0 when there are none).
  """
  tokens = input_ids.shape[1]
  following = jnp.minimum(positions + 1, tokens - 1)
  targets = jnp.take_along_axis(input_ids, following, axis=1)
  weights = jnp.where(positions + 1 < tokens,
                      jnp.take_along_axis(loss_mask, following, axis=1), 0).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def resize_logits(mask_logits: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Bilinear resize of `[batch, h, w]` logits to `[batch, *shape]` (half-pixel centres)."""
  if mask_logits.shape[1:] == tuple(shape):
    return mask_logits
  return jax.image.resize(
      mask_logits, (mask_logits.shape[0], *shape), method="bilinear", antialias=False)


def mask_bce_dice(
    mask_logits: jax.Array, gt_masks: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Per-pixel sigmoid BCE and Dice loss of predicted masks, averaged over weighted samples.

  Args:
    mask_logits: `[batch, h, w]` at the decoder's resolution; resized to the ground truth's.
    gt_masks: `[batch, height, width]` in {0, 1}.
    weights: `[batch]`, 1 for samples whose mask is supervised (0 for no-target samples).

  Returns:
    (bce, dice): scalars. Dice is 1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1) per sample.
  """
  logits = resize_logits(mask_logits, gt_masks.shape[1:]).astype(jnp.float32)
  gt = gt_masks.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, gt), axis=(1, 2))
  probs = jax.nn.sigmoid(logits)
  inter = jnp.sum(probs * gt, axis=(1, 2))
  total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(gt, axis=(1, 2))
  dice = 1.0 - (2.0 * inter + 1.0) / (total + 1.0)
  return jnp.sum(bce * weights) / denom, jnp.sum(dice * weights) / denom


def no_target_bce(no_target_logits: jax.Array, no_target: jax.Array) -> jax.Array:
  """Sigmoid BCE of the no-target score `[batch]` against the flag `[batch]`."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(
      no_target_logits.astype(jnp.float32), no_target.astype(jnp.float32)))


def prior_adjusted_logits(no_target_logits: jax.Array, prior: float) -> jax.Array:
  """The no-target logits the training losses see: `logits + log(prior / (1 - prior))`.

  Logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021): when
  no-target expressions make up the share `prior` of the training data, a loss minimised by the
  adjusted logit `log P_train(none) - log P_train(target)` leaves the model's own logit at
  `log P(none | x) - log P(target | x)` under balanced classes. Thresholding it at 0 (p = 0.5)
  then weighs a missed no-target and a wrongly rejected expression alike, instead of favouring
  whichever class the data holds more of. `prior = 0.5` changes nothing.

  Args:
    no_target_logits: `[batch]`.
    prior: share of no-target expressions in the training data, in (0, 1).

  Returns:
    `[batch]` float32.
  """
  if not 0.0 < prior < 1.0:
    raise ValueError(f"loss.no_target_prior must lie in (0, 1), got {prior}")
  return no_target_logits.astype(jnp.float32) + float(np.log(prior / (1.0 - prior)))


def region_targets(masks: jax.Array, boxes: jax.Array, valid: jax.Array,
                   min_coverage: float) -> jax.Array:
  """Which proposals the expression refers to: the target mask covers `min_coverage` of the box.

  Args:
    masks: `[batch, height, width]` target masks in {0, 1}, in the boxes' pixel frame.
    boxes: `[batch, regions, 4]` x1, y1, x2, y2 pixels; a pixel belongs to a box when its centre
      lies in `[x1, x2) x [y1, y2)`.
    valid: `[batch, regions]` bool, proposal present.
    min_coverage: fraction of the box's pixels that must be target pixels.

  Returns:
    `[batch, regions]` float32 in {0, 1}; 0 for invalid proposals and for boxes without a pixel.
  """
  h, w = masks.shape[1:]
  ys = jnp.arange(h, dtype=jnp.float32) + 0.5
  xs = jnp.arange(w, dtype=jnp.float32) + 0.5
  boxes = boxes.astype(jnp.float32)
  in_y = ((ys >= boxes[..., 1:2]) & (ys < boxes[..., 3:4])).astype(jnp.float32)  # [b, r, h]
  in_x = ((xs >= boxes[..., 0:1]) & (xs < boxes[..., 2:3])).astype(jnp.float32)  # [b, r, w]
  covered = jnp.einsum("brh,brw,bhw->br", in_y, in_x, masks.astype(jnp.float32))
  area = jnp.sum(in_y, -1) * jnp.sum(in_x, -1)
  hit = (area > 0) & (covered >= min_coverage * area) & valid.astype(bool)
  return hit.astype(jnp.float32)


def region_selection_ce(match_logits: jax.Array, no_target_logits: jax.Array,
                        targets: jax.Array, no_target: jax.Array) -> jax.Array:
  """Cross-entropy of "which proposal, or none" (`models.no_target` defines the logits).

  The classes are the proposals and a null class whose logit is
  `no_target_logit + evidence(match_logits)` (the logsumexp of the valid proposals' logits, or 0
  without one: what the head subtracts), so the null class's log-odds against all proposals is
  the no-target logit. A row without a valid proposal leaves the null class alone against padded
  slots: probability 1, no loss. The target distribution is uniform over the proposals of
  `targets`, or all on the null class for a no-target expression; expressions with a target but
  no proposal marked in `targets` do not count.

  Args:
    match_logits: `[batch, regions]` (`no_target.INVALID_LOGIT` for padded proposals).
    no_target_logits: `[batch]`.
    targets: `[batch, regions]` in {0, 1}, from `region_targets`.
    no_target: `[batch]` bool.

  Returns:
    Scalar mean over the expressions that count (0 when none does).
  """
  match_logits = match_logits.astype(jnp.float32)
  none = no_target.astype(jnp.float32)
  null = no_target_logits.astype(jnp.float32) + evidence(match_logits)
  logits = jnp.concatenate([match_logits, null[:, None]], axis=-1)
  dist = jnp.concatenate([targets * (1.0 - none)[:, None], none[:, None]], axis=-1)
  mass = jnp.sum(dist, axis=-1)
  dist = dist / jnp.maximum(mass, 1.0)[:, None]
  counts = (mass > 0).astype(jnp.float32)
  ce = -jnp.sum(dist * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return jnp.sum(ce * counts) / jnp.maximum(jnp.sum(counts), 1.0)
