"""The tiny UniRES++ end to end: forward, loss parts, overfitting one batch, input errors.

Needs no PyTorch (`pip install -e .` and pytest); the PyTorch backbones' import into the
assembled model is tests/models/test_unires_import.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unires_jax import models
from unires_jax.config_lib import load_config
from unires_jax.models import layers, prompt
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.models.unires import UniRESOutput, compute_loss, train_forward


@pytest.fixture(scope="module")
def config():
  return load_config("tiny")


def _loss_fn(model, batch, cfg):
  outputs = model(batch)
  total, parts = compute_loss(outputs, batch, cfg.model.loss, cfg.model.mask_decoder.aux_loss)
  return total, (parts, outputs)


def test_forward_shapes_and_finite_loss(config):
  model = models.build_model(config, nnx.Rngs(0))
  batch = synthetic_batch(config.model, 2, no_target_every=2)
  total, (parts, out) = nnx.jit(lambda model, batch: _loss_fn(model, batch, config))(
      model, batch)  # compiled: faster than the op-by-op forward
  s = config.model.convnext.image_size
  vocab = config.model.llm.vocab_size + prompt.num_special_tokens()
  assert out.logits.shape == (2, batch["input_ids"].shape[1], vocab)
  assert out.mask_logits.shape == (2, s // 4, s // 4)
  assert len(out.aux_mask_logits) == config.model.mask_decoder.num_layers
  assert out.no_target_logits.shape == (2,)
  regions = config.model.max_objects + config.model.max_parts
  assert out.region_logits.shape == (2, regions)
  valid = np.concatenate([batch["object_valid"], batch["part_valid"]], axis=1)
  assert np.all(np.asarray(out.region_logits)[~valid] <= -1e3)  # padded proposals never match
  assert set(parts) == {"lm", "mask_bce", "mask_dice", "aux_mask", "no_target", "region"}
  for name, value in parts.items():
    assert np.isfinite(value), name
  assert np.isfinite(total)


def test_no_target_losses_see_the_prior_adjusted_logit(config):
  """Both no-target parts (`no_target`, `region`) use logit + log(prior / (1 - prior))."""
  batch = synthetic_batch(config.model, 4, no_target_every=2)
  b, t = batch["input_ids"].shape
  side = config.model.convnext.image_size // 4
  regions = config.model.max_objects + config.model.max_parts
  rng = np.random.default_rng(0)
  vocab = config.model.llm.vocab_size + prompt.num_special_tokens()
  out = UniRESOutput(  # random outputs of the model's shapes: only the loss is under test
      logits=jnp.asarray(rng.normal(size=(b, t, vocab)), jnp.float32),
      lm_positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
      mask_logits=jnp.asarray(rng.normal(size=(b, side, side)), jnp.float32),
      aux_mask_logits=[jnp.asarray(rng.normal(size=(b, side, side)), jnp.float32)],
      no_target_logits=jnp.asarray(rng.normal(size=(b,)), jnp.float32),
      region_logits=jnp.asarray(rng.normal(size=(b, regions)), jnp.float32))
  weights = config.model.loss.copy_and_resolve_references()
  weights.no_target_prior = 0.2
  _, adjusted = compute_loss(out, batch, weights)
  weights.no_target_prior = 0.5
  _, plain = compute_loss(out, batch, weights)
  shifted = out.replace(no_target_logits=out.no_target_logits + np.log(0.25))
  _, by_hand = compute_loss(shifted, batch, weights)
  for name in ("no_target", "region"):
    np.testing.assert_allclose(adjusted[name], by_hand[name], rtol=1e-6, err_msg=name)
    assert abs(float(adjusted[name]) - float(plain[name])) > 1e-3, name
  for name in ("lm", "mask_bce", "mask_dice", "aux_mask"):
    assert float(adjusted[name]) == float(plain[name]), name


def test_training_takes_lm_logits_at_the_answer_only(config):
  """`train_forward` computes the LM head at `max_answer_tokens` positions per row, not at every
  token, and gives the loss of the logits at every position (the same function of the
  parameters, so the same gradients)."""
  model = models.build_model(config, nnx.Rngs(0))
  batch = synthetic_batch(config.model, 3, no_target_every=2)
  batch["loss_mask"][1, -4:] = 1  # rows with different answer lengths: 2 and 4 targets

  @nnx.jit
  def losses(model):
    answer, full = train_forward(model, batch), model(batch)
    return (compute_loss(answer, batch, config.model.loss)[1]["lm"], answer.logits,
            compute_loss(full, batch, config.model.loss)[1]["lm"], full.logits)

  answer_lm, answer_logits, full_lm, full_logits = losses(model)
  b, t = batch["input_ids"].shape
  assert full_logits.shape[:2] == (b, t)
  assert answer_logits.shape[:2] == (b, config.model.max_answer_tokens)
  assert t > config.model.max_answer_tokens
  assert float(full_lm) > 0
  np.testing.assert_allclose(answer_lm, full_lm, rtol=1e-6)


def _mask_iou(mask_logits, gt):
  pred = np.asarray(jax.image.resize(mask_logits, gt.shape, "bilinear")) > 0
  gt = gt > 0.5
  return (pred & gt).sum() / max((pred | gt).sum(), 1)


@pytest.mark.slow
def test_tiny_model_overfits_one_batch(config):
  """The acceptance bar: mask IoU > 0.9 within 300 steps, no NaN gradient, LM loss decreases."""
  model = models.build_model(config, nnx.Rngs(0))
  batch = jax.tree.map(jnp.asarray, synthetic_batch(config.model, 4, seed=1))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.0), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    (_, (parts, out)), grads = nnx.value_and_grad(_loss_fn, has_aux=True)(model, batch, config)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    optimizer.update(model, grads)
    return parts, out.mask_logits, finite

  first_lm, ious = None, []
  for i in range(300):
    parts, mask_logits, finite = step(model, optimizer, batch)
    assert bool(finite), f"non-finite gradient at step {i}"
    assert all(np.isfinite(v) for v in parts.values()), (i, parts)
    if first_lm is None:
      first_lm = float(parts["lm"])
    iou = np.mean([_mask_iou(mask_logits[b], np.asarray(batch["masks"][b])) for b in range(4)])
    ious.append(iou)
    if iou > 0.9 and i >= 20:
      break
  assert ious[-1] > 0.9, f"mask IoU after {len(ious)} steps: {ious[-1]:.3f}"
  assert float(parts["lm"]) < 0.5 * first_lm, (first_lm, float(parts["lm"]))


def test_prompt_without_seg_token_is_rejected(config):
  special = prompt.SpecialTokens.appended_to(config.model.llm.vocab_size)
  with pytest.raises(ValueError, match=r"exactly one \[SEG\]"):
    prompt.build_sequence([5, 6, 7], [8, 9], special=special, num_image_tokens=16,
                          num_objects=1, num_parts=0, max_objects=4, max_parts=4, max_length=64)


def test_batch_without_seg_token_is_rejected(config):
  model = models.build_model(config, nnx.Rngs(0))
  batch = synthetic_batch(config.model, 2)
  special = prompt.SpecialTokens.appended_to(config.model.llm.vocab_size)
  batch["input_ids"][1][batch["input_ids"][1] == special.seg] = 3
  with pytest.raises(ValueError, match=r"row 1 holds 0 \[SEG\]"):
    model(batch)


def test_inverted_box_is_rejected(config):
  model = models.build_model(config, nnx.Rngs(0))
  batch = synthetic_batch(config.model, 2)
  batch["object_boxes"][1, 0] = [30, 5, 10, 20]  # x2 < x1
  with pytest.raises(ValueError, match=r"object_boxes.*\[1, 0\].*x2 < x1"):
    model(batch)


def test_wrong_image_size_is_rejected(config):
  model = models.build_model(config, nnx.Rngs(0))
  batch = synthetic_batch(config.model, 1)
  batch["image_low"] = np.zeros((1, 48, 48, 3), np.float32)
  with pytest.raises(ValueError, match="image_size"):
    model(batch)


def test_sequence_layout(config):
  special = prompt.SpecialTokens.appended_to(100)
  seq = prompt.build_sequence([1, 2], [3, special.seg], special=special, num_image_tokens=4,
                              num_objects=1, num_parts=0, max_objects=2, max_parts=1,
                              max_length=24)
  ids, attend, loss = seq["input_ids"], seq["attention_mask"], seq["loss_mask"]
  assert list(ids[:6]) == [special.image_start] + [special.image_patch] * 4 + [special.image_end]
  # Object slot 0 present, slot 1 absent (masked), the single part slot absent.
  assert list(ids[6:9]) == [special.object_start, special.object_patch, special.object_end]
  assert list(attend[6:15]) == [1, 1, 1, 0, 0, 0, 0, 0, 0]
  assert list(ids[15:19]) == [1, 2, 3, special.seg]
  assert list(loss[15:20]) == [0, 0, 1, 1, 0]
  assert attend[19:].sum() == 0


def test_bfloat16_compute_keeps_float32_parameters(config):
  config = config.copy_and_resolve_references()
  config.model.dtype = "bfloat16"
  model = models.build_model(config, nnx.Rngs(0))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {p.dtype for p in params} == {jnp.dtype("float32")}
  batch = synthetic_batch(config.model, 2, no_target_every=2)
  out = nnx.jit(lambda m, b: m(b))(model, batch)
  assert out.logits.dtype == jnp.bfloat16
  total, parts = compute_loss(out, batch, config.model.loss)
  assert np.isfinite(total), parts


def test_proposals_reach_the_llm_and_absent_slots_do_not(config):
  """Moving a present object's box changes the outputs; moving an absent slot's box does not."""
  model = models.build_model(config, nnx.Rngs(0))
  forward = nnx.jit(lambda m, b: m(b))
  batch = synthetic_batch(config.model, 1)
  assert batch["object_valid"][0].tolist() == [True, False, False, False]
  base = forward(model, batch)

  moved_present = {**batch, "object_boxes": batch["object_boxes"].copy()}
  moved_present["object_boxes"][0, 0] = [2.0, 3.0, 20.0, 30.0]
  out = forward(model, moved_present)
  assert np.abs(np.asarray(out.logits - base.logits)).max() > 1e-4
  assert np.abs(np.asarray(out.mask_logits - base.mask_logits)).max() > 1e-4

  moved_absent = {**batch, "object_boxes": batch["object_boxes"].copy()}
  moved_absent["object_boxes"][0, 2] = [2.0, 3.0, 20.0, 30.0]
  out = forward(model, moved_absent)
  real = batch["attention_mask"][0].astype(bool)
  np.testing.assert_allclose(out.logits[0, real], base.logits[0, real], atol=1e-6, rtol=0)
  np.testing.assert_allclose(out.mask_logits, base.mask_logits, atol=1e-6, rtol=0)


def test_without_proposals_the_no_target_logit_is_the_text_prior(config):
  """Evaluating on an image without proposals used to give a logit of prior + 1e4 - log(8):
  "no target" for every expression at any threshold. Now it is the text prior, from the same
  [SEG] state that a batch with proposals would score against them."""
  model = models.build_model(config, nnx.Rngs(0))
  batch = synthetic_batch(config.model, 8, proposals=False)
  assert not batch["object_valid"].any() and not batch["part_valid"].any()
  out = nnx.jit(lambda m, b: m(b))(model, batch)
  logits = np.asarray(out.no_target_logits)
  assert np.all(np.isfinite(logits)) and np.all(np.abs(logits) < 1e3), logits
  threshold = config.model.no_target_threshold
  no_target = logits > np.log(threshold / (1 - threshold))
  assert not no_target.all(), logits
  np.testing.assert_array_equal(np.asarray(out.region_logits), -1e4)


def test_param_keys_give_the_parameters_of_nnx_rngs(config):
  """`layers.ParamKeys` (what the sharded model, the converters and the summary build with, so
  that an abstract 7B build takes seconds) initialises exactly as `nnx.Rngs(params=seed)`."""
  want = nnx.state(models.build_model(config, nnx.Rngs(params=3)), nnx.Param)
  got = nnx.state(models.build_model(config, layers.ParamKeys(3)), nnx.Param)
  want, got = jax.tree.leaves(want), jax.tree.leaves(got)
  assert len(want) == len(got) > 100
  for a, b in zip(want, got):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  other = jax.tree.leaves(nnx.state(models.build_model(config, layers.ParamKeys(4)), nnx.Param))
  assert any(not np.array_equal(a, b) for a, b in zip(other, got))  # the seed matters
