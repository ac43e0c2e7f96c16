"""Training with LoRA (config.model.llm.lora): the demo config with the switch on, scanned
layers and adapter dropout. Only adapters, the added vocabulary rows and the new parts move; the
optimizer holds nothing for the frozen LLM; the loss goes down."""

import jax
import numpy as np
import pytest
from flax import nnx

from unires_jax import checkpoint, models, parallel, utils
from unires_jax.config_lib import load_config
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.train import step as step_lib
from unires_jax.train.state import StateFactory

ADAPTED = ("/lora_a", "/lora_b", "llm/new_token_embedding", "llm/new_token_head")


def _flat(tree):
  """{path: array} of every array leaf (a Variable's value, an optimizer count)."""
  value = lambda v: v.get_value() if isinstance(v, nnx.Variable) else v
  return {utils.path_str(p): np.asarray(value(v)) for p, v in
          jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
          if hasattr(value(v), "shape")}


@pytest.fixture(scope="module")
def lora_demo():
  """The demo config as `--config.model.llm.lora.rank=4` sets it, scanned, a short schedule."""
  config = load_config("configs/demo.py")
  config.model.llm.lora.rank = 4
  config.model.scan_layers = True
  config.train.num_steps = 100
  config.optimizer.warmup_steps = 0
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  factory = StateFactory(config, mesh)
  batch = synthetic_batch(config.model, 4, seed=0, no_target_every=2)
  batch = parallel.shard_batch(step_lib.model_fields(batch), mesh)
  return factory, step_lib.make_train_step(factory), batch


# Both tests run the fixture's step on one worker (`xdist_group`), so it compiles once: on two
# workers side by side each compiled it (80 s each in a run of the whole suite).
@pytest.mark.slow  # the first call compiles the demo's LoRA train step: about a minute
@pytest.mark.xdist_group("lora_demo")
def test_only_adapters_and_new_parts_train(lora_demo):
  factory, step, batch = lora_demo
  state = factory.create()
  opt_paths = list(_flat(state.opt_state))
  llm_state = [p for p in opt_paths if "/llm/" in f"/{p}"]
  assert llm_state and all(p.endswith(ADAPTED) for p in llm_state), llm_state
  assert not [p for p in opt_paths if "embed_tokens" in p or "lm_head/kernel" in p]

  before = _flat(state.params)
  assert not before["llm/model/layers/self_attn/q_proj/lora_b"].any()
  for _ in range(2):  # A moves from the second step on (its gradient is zero while B = 0)
    state, metrics = step(state, batch)
    assert int(metrics["finite"]) == 1
  after = _flat(state.params)
  moved = {path for path, value in before.items() if not np.array_equal(after[path], value)}
  frozen = {p for p in before if p.startswith("llm/") and not p.endswith(ADAPTED)}
  assert frozen and not moved & frozen, sorted(moved & frozen)[:5]
  adapted = set(before) - frozen - {p for p in before if not p.startswith("llm/")}
  assert adapted <= moved, sorted(adapted - moved)
  # Every new part trains (a parameter no loss reaches, as CLIP's unused last norm, may not).
  for part in ("vision", "convnext", "image_projector", "object_projector", "part_projector",
               "mask_decoder", "no_target_head"):
    assert any(p.startswith(part + "/") for p in moved), part


@pytest.mark.slow
@pytest.mark.xdist_group("lora_demo")
def test_demo_loss_decreases(lora_demo):
  factory, step, batch = lora_demo
  state = factory.create()
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.8 * losses[0], losses


def test_init_from_a_checkpoint_without_adapters(tmp_path):
  """Released weights converted with LoRA off: a LoRA run starts from them, its adapters fresh
  (B = 0, the added rows the checkpoint's), so it starts from the checkpoint's model."""
  config = load_config("configs/tiny.py")
  plain = nnx.state(models.build_model(config, nnx.Rngs(params=7)), nnx.Param)
  checkpoint.save_converted(plain, config, str(tmp_path / "converted"))
  config.model.llm.lora.update(rank=2, targets=("q_proj", "up_proj"))
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  factory = StateFactory(config, mesh)
  state = factory.params_from(str(tmp_path / "converted"))
  params = _flat(state)
  saved = _flat(plain)
  for path, value in saved.items():
    np.testing.assert_array_equal(params[path], value, err_msg=path)
  added = sorted(set(params) - set(saved))
  assert len(added) == 2 * 2 * 2 + 2, added  # 2 layers x 2 targets x (A, B), 2 row tables
  assert not params["llm/model/layers/0/mlp/up_proj/lora_b"].any()
  assert params["llm/model/layers/0/mlp/up_proj/lora_a"].any()
  np.testing.assert_array_equal(params["llm/new_token_embedding"],
                                saved["llm/model/embed_tokens/embedding"][128:])
  np.testing.assert_array_equal(params["llm/new_token_head"], saved["llm/lm_head/kernel"][:, 128:])
  # A checkpoint with adapters (this one saved) restores as it is.
  checkpoint.save_converted(state, config, str(tmp_path / "with_adapters"))
  again = _flat(factory.params_from(str(tmp_path / "with_adapters")))
  assert again.keys() == params.keys()
  for path, value in params.items():
    np.testing.assert_array_equal(again[path], value, err_msg=path)
