"""LoRA adapters on the LLM (models/lora.py): equal to the base at init, to the merged model
after, named axes, scanned layers, dropout only under a key, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unires_jax.config_lib import load_config
from unires_jax.convert import torch_io
from unires_jax.models import lora as lora_lib
from unires_jax.models.llama import LlamaForCausalLM

VOCAB = 138  # the tiny config's 128 + 10 added rows
LORA = dict(rank=4, alpha=8.0, dropout=0.2, targets=("q_proj", "v_proj", "o_proj", "down_proj"))


def _llm_config(**lora):
  cfg = dict(load_config("configs/tiny.py").model.llm)
  return dict(cfg, lora=dict(cfg["lora"], **lora))


def _ids():
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
  ids[:, -2:] = [128, 137]  # added rows in every row
  return jnp.asarray(ids)


def _randomise_adapters(model, seed=1):
  """Nonzero B and added rows unlike the table's: the adapters now change the output."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam):
      var.set_value(var[...] + jnp.asarray(rng.normal(0, 0.1, var[...].shape), jnp.float32))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_starts_equal_to_base_and_then_equals_the_merged_model(scan_layers):
  base = LlamaForCausalLM(_llm_config(rank=0), vocab_size=VOCAB, rngs=nnx.Rngs(0),
                          scan_layers=scan_layers)
  model = LlamaForCausalLM(_llm_config(**LORA), vocab_size=VOCAB, rngs=nnx.Rngs(0),
                           scan_layers=scan_layers)
  ids = _ids()
  # The base weights are the plain model's (A draws its own key): same logits at B = 0.
  np.testing.assert_allclose(model(ids)[0], base(ids)[0], atol=1e-5, rtol=0)

  _randomise_adapters(model)
  assert np.abs(np.asarray(model(ids)[0] - base(ids)[0])).max() > 1e-2
  # Merged by hand into the plain model: W + alpha / rank * A B, the added rows replaced.
  params = torch_io.unstacked_params(model)
  merged = {}
  for path, (var, index) in torch_io.unstacked_params(base).items():
    value = torch_io.read_unstacked(*params[path])
    if path.endswith("/kernel") and path[:-6] + "lora_a" in params:
      a, b = (torch_io.read_unstacked(*params[path[:-6] + n]) for n in ("lora_a", "lora_b"))
      value = lora_lib.merged_kernel(value, a, b, LORA["alpha"] / LORA["rank"])
    merged[path] = np.array(value)
  merged["model/embed_tokens/embedding"][128:] = np.asarray(model.new_token_embedding[...])
  merged["lm_head/kernel"][:, 128:] = np.asarray(model.new_token_head[...])
  torch_io.assign_params(base, merged, "merged")
  np.testing.assert_allclose(model(ids)[0], base(ids)[0], atol=1e-5, rtol=0)


def test_adapters_have_logical_axes_and_are_stacked_when_scanned():
  model = LlamaForCausalLM(_llm_config(**LORA), vocab_size=VOCAB, rngs=nnx.Rngs(0),
                           scan_layers=True)
  q = model.model.layers.self_attn.q_proj
  assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
  assert q.lora_b.get_metadata()["out_sharding"] == ("layers", "lora_rank", "heads")
  assert q.lora_a[...].shape == (2, 64, 4) and not np.any(q.lora_b[...])
  down = model.model.layers.mlp.down_proj
  assert down.lora_a.get_metadata()["out_sharding"] == ("layers", "mlp", "lora_rank")
  assert not hasattr(model.model.layers.self_attn.k_proj, "lora_a")  # not a target
  assert model.new_token_embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
  assert model.new_token_head[...].shape == (64, 10)
  bound = 1 / np.sqrt(64)  # PEFT's kaiming-uniform A
  assert 0.5 * bound < np.abs(np.asarray(q.lora_a[...])).max() <= bound


def test_dropout_acts_only_under_a_key_and_differs_per_layer():
  model = LlamaForCausalLM(_llm_config(**LORA), vocab_size=VOCAB, rngs=nnx.Rngs(0))
  _randomise_adapters(model)
  ids = _ids()
  plain = model(ids)[0]
  key = jax.random.key(0)
  with lora_lib.dropout_key(key):
    dropped = model(ids)[0]
    again = model(ids)[0]
  np.testing.assert_array_equal(dropped, again)  # the key decides the mask
  assert np.abs(np.asarray(dropped - plain)).max() > 1e-3
  np.testing.assert_array_equal(model(ids)[0], plain)  # no key outside the block

  x = jnp.ones((1, 3, 64))
  q = model.model.layers[0].self_attn.q_proj
  outs = []
  for layer in (0, 1):
    with lora_lib.dropout_key(key), lora_lib.layer_scope(layer):
      outs.append(np.asarray(q(x)))
  assert not np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("field,value,message", [
    ("rank", -1, r"lora.rank=-1 must be an integer >= 0"),
    ("targets", ("q_proj", "qkv"), r"lora.targets: unknown projection 'qkv'"),
    ("dropout", 1.0, r"lora.dropout=1.0 must lie in \[0, 1\)"),
    ("alpha", 0.0, r"lora.alpha=0.0 must be positive"),
    ("targets", (), r"lora.targets is empty"),
    ("scale", 2.0, r"lora has no field 'scale'"),
])
def test_bad_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=f"config.model.llm.{message}"):
    LlamaForCausalLM(_llm_config(**{**LORA, field: value}), vocab_size=VOCAB, rngs=nnx.Rngs(0))


def test_off_by_default_and_in_old_configs():
  cfg = load_config("configs/tiny.py").model.llm
  assert cfg.lora.rank == 0 and tuple(cfg.lora.targets) == ("q_proj", "v_proj")
  assert not lora_lib.read_lora_config(None).enabled  # a config.json from before LoRA
  model = LlamaForCausalLM(dict(cfg), vocab_size=VOCAB, rngs=nnx.Rngs(0))
  assert model.new_token_embedding is None
  assert not jax.tree_util.tree_leaves(nnx.state(model, nnx.LoRAParam))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dropout_under_remat_and_grad(scan_layers):
  """Adapter dropout inside rematerialised (and scanned) layers, differentiated: the keys
  reach every layer through `jax.checkpoint` and `lax.scan`."""
  model = LlamaForCausalLM(_llm_config(**LORA), vocab_size=VOCAB, rngs=nnx.Rngs(0),
                           remat="full", scan_layers=scan_layers)
  _randomise_adapters(model)
  graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
  ids = _ids()

  def loss(adapters, key):
    with lora_lib.dropout_key(key):
      return jnp.mean(nnx.merge(graphdef, adapters, rest)(ids)[0] ** 2)

  grad = jax.jit(jax.grad(loss))
  plain, dropped = grad(adapters, None), grad(adapters, jax.random.key(3))
  leaves = lambda g: [np.asarray(x) for x in jax.tree_util.tree_leaves(g)]
  assert all(np.isfinite(x).all() for x in leaves(dropped))
  assert any(not np.allclose(a, b) for a, b in zip(leaves(plain), leaves(dropped)))
