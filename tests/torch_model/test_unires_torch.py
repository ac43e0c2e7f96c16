"""unires_jax.torch: the exported tiny UniRES++ in PyTorch computes what the JAX model computes."""

import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from unires_jax import models
from unires_jax.config_lib import load_config
from unires_jax.convert import unires as convert_unires
from unires_jax.models import prompt
from unires_jax.torch import UniRESPP
from unires_jax.torch.heads import INVALID_LOGIT

ATOL = 1e-4  # float32 on both sides; different op orders (XLA vs PyTorch) only


def _batch(cfg, proposals: list[tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
  """Random images and boxes; row i has proposals[i] = (objects, parts) present, the rest padded."""
  rng = np.random.default_rng(seed)
  special = prompt.SpecialTokens.appended_to(cfg.llm.vocab_size)
  s_low, s_high = cfg.vision.image_size, cfg.convnext.image_size
  n_img = (s_low // cfg.vision.patch_size) ** 2
  max_length = n_img + 2 + 3 * (cfg.max_objects + cfg.max_parts) + 12

  def boxes(count, slots):
    corners = rng.uniform(0, s_high, (slots, 2, 2))
    out = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    out[count:] = 0.0
    return out.astype(np.float32), np.arange(slots) < count

  rows = []
  for num_objects, num_parts in proposals:
    object_boxes, object_valid = boxes(num_objects, cfg.max_objects)
    part_boxes, part_valid = boxes(num_parts, cfg.max_parts)
    seq = prompt.build_sequence(
        rng.integers(1, cfg.llm.vocab_size, 5).tolist(),
        [int(rng.integers(1, cfg.llm.vocab_size)), special.seg], special=special,
        num_image_tokens=n_img, num_objects=num_objects, num_parts=num_parts,
        max_objects=cfg.max_objects, max_parts=cfg.max_parts, max_length=max_length)
    rows.append({
        "image_low": rng.normal(size=(s_low, s_low, 3)).astype(np.float32),
        "image_high": rng.normal(size=(s_high, s_high, 3)).astype(np.float32),
        "object_boxes": object_boxes, "object_valid": object_valid,
        "part_boxes": part_boxes, "part_valid": part_valid, **seq})
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(tiny JAX model, its config, the export directory)."""
  config = load_config("tiny")
  assert config.model.dtype == "float32"
  assert config.model.mask_decoder.cross_attention_impl == "xla"  # the reference rule
  model = models.build_model(config, nnx.Rngs(0))
  out = tmp_path_factory.mktemp("unires") / "exported"
  convert_unires.export_pytorch(model, config.model, str(out))
  return model, config, out


def test_pytorch_model_matches_jax(exported):
  model, config, out = exported
  batch = _batch(config.model, [(3, 2), (1, 0), (0, 0)])  # (0, 0): the text prior alone
  want = nnx.jit(lambda m, b: m(b))(model, batch)  # compiling beats op-by-op: 4 s, not 20 s
  torch_model = UniRESPP.from_pretrained(str(out))
  with torch.no_grad():
    got = torch_model(batch)

  def check(name, theirs, ours):
    theirs, ours = theirs.numpy(), np.asarray(ours)
    assert theirs.shape == ours.shape, name
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0, err_msg=name)

  check("logits", got.logits, want.logits)
  check("mask_logits", got.mask_logits, want.mask_logits)
  assert len(got.aux_mask_logits) == len(want.aux_mask_logits) == 3
  for i, (theirs, ours) in enumerate(zip(got.aux_mask_logits, want.aux_mask_logits)):
    check(f"aux_mask_logits[{i}]", theirs, ours)
  check("no_target_logits", got.no_target_logits, want.no_target_logits)
  valid = np.concatenate([batch["object_valid"], batch["part_valid"]], axis=1)
  check("region_logits (valid)", got.region_logits[valid], np.asarray(want.region_logits)[valid])
  assert np.all(got.region_logits.numpy()[~valid] == INVALID_LOGIT)


def test_missing_head_tensor_is_named(exported, tmp_path):
  _, _, out = exported
  heads = safetensors.numpy.load_file(out / convert_unires.HEADS_FILE)
  name = "mask_decoder/level_embed"
  del heads[name]
  broken = tmp_path / "broken"
  broken.mkdir()
  for part in ("vision_tower", "high_res_encoder", "llm", "config.json"):
    (broken / part).symlink_to(out / part)
  safetensors.numpy.save_file(heads, broken / convert_unires.HEADS_FILE)
  with pytest.raises(ValueError, match=f"unires_heads.safetensors: tensor '{name}' is missing"):
    UniRESPP.from_pretrained(str(broken))
