"""UniRES++ losses: LM cross-entropy on answer tokens, mask BCE + Dice, no-target BCE."""

import jax
import jax.numpy as jnp
import optax


def lm_cross_entropy(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Next-token cross-entropy averaged over the target tokens.

  Args:
    logits: `[batch, tokens, vocab]`; position t predicts token t + 1.
    input_ids: `[batch, tokens]`.
    loss_mask: `[batch, tokens]`, 1 where the token is a target (the answer tokens).

  Returns:
    Scalar mean over target tokens (0 when there are none).
  """
  targets = input_ids[:, 1:]
  weights = loss_mask[:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), targets)
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
