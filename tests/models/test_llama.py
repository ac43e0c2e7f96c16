"""LLaMA decoder: parity with transformers (logits, padding, greedy generation) and import."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unires_jax import config_lib
from unires_jax.convert import torch_io
from unires_jax.convert.llama import (check_llm_config, llm_config_from_hf, load_llama,
                                      save_llama)
from unires_jax.kernels import llm_attention
from unires_jax.models.generate import generate
from unires_jax.models.llama import LlamaForCausalLM

# float32 on CPU: differences are rounding in a few hundred sums.
ATOL = 1e-4
VOCAB = 128


def _hf_config(**overrides) -> transformers.LlamaConfig:
  kw = dict(
      vocab_size=VOCAB,
      hidden_size=64,
      intermediate_size=160,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=4,
      rms_norm_eps=1e-5,
      rope_theta=5e5,
      max_position_embeddings=64,
  )
  kw.update(overrides)
  return transformers.LlamaConfig(**kw)


def _save(path, **overrides) -> transformers.LlamaForCausalLM:
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(_hf_config(**overrides)).eval()
  model.save_pretrained(path)
  return model


def _load(path, attention="xla", **kwargs) -> LlamaForCausalLM:
  cfg = dict(llm_config_from_hf(torch_io.read_config_json(str(path))), attention=attention)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), **kwargs)
  load_llama(model, str(path))
  return model


def _torch_logits(model, ids, mask=None):
  kw = {}
  if mask is not None:
    kw = dict(
        attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0)),
    )
  with torch.no_grad():
    return model(torch.tensor(ids), **kw).logits.numpy()


@nnx.jit
def _run(model, ids, mask=None, cache=None):
  """One jitted forward: compiling the whole step beats dispatching its ops one by one."""
  return model(ids, attention_mask=mask, cache=cache)


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def gqa(tmp_path_factory, request):
  """A 2-layer GQA checkpoint (2 kv heads for 4 query heads) and its import, with unrolled or
  scanned layers (`scan_layers`)."""
  path = tmp_path_factory.mktemp("gqa")
  torch_model = _save(path, num_key_value_heads=2)
  return torch_model, _load(path, scan_layers=request.param), path


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_logits_and_hidden_states_match_transformers(tmp_path, kv_heads, scan_layers):
  torch_model = _save(tmp_path, num_key_value_heads=kv_heads)
  model = _load(tmp_path, scan_layers=scan_layers)
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9))

  logits, hidden, cache = model(jnp.asarray(ids))

  assert cache is None
  np.testing.assert_allclose(logits, _torch_logits(torch_model, ids), atol=ATOL, rtol=0)
  with torch.no_grad():
    want_hidden = torch_model.model(torch.tensor(ids)).last_hidden_state.numpy()
  np.testing.assert_allclose(hidden, want_hidden, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers_on_tokens(gqa, side):
  torch_model, model, _ = gqa
  ids = np.random.default_rng(1).integers(0, VOCAB, (3, 8))
  mask = np.ones((3, 8), np.int64)
  if side == "left":
    mask[1, :3] = mask[2, :5] = 0
  else:
    mask[1, 5:] = mask[2, 3:] = 0

  logits, _, _ = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))

  real = mask.astype(bool)
  want = _torch_logits(torch_model, ids, mask)
  assert np.abs(np.asarray(logits)[real] - want[real]).max() < ATOL
  # Padding changes nothing for real tokens: row 1 alone, unpadded, gives the same logits.
  alone, _, _ = model(jnp.asarray(ids[1:2, real[1]]))
  np.testing.assert_allclose(np.asarray(logits)[1, real[1]], alone[0], atol=ATOL, rtol=0)


def test_inputs_embeds_and_cached_steps_equal_full_forward(gqa):
  _, model, _ = gqa
  ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 7)))
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
  full, _, _ = model(ids, attention_mask=mask)

  from_embeds, _, _ = model(inputs_embeds=model.embed(ids), attention_mask=mask)
  np.testing.assert_allclose(from_embeds, full, atol=1e-6, rtol=0)

  # Prefill four tokens, then one token per call.
  cache = model.init_cache(2, 7)
  first, _, cache = _run(model, ids[:, :4], mask[:, :4], cache)
  steps = [first]
  for i in range(4, 7):
    step, _, cache = _run(model, ids[:, i : i + 1], cache=cache)
    steps.append(step)
  assert int(cache.length) == 7
  np.testing.assert_array_equal(cache.mask, mask.astype(bool))
  real = np.asarray(mask, bool)
  cached = np.asarray(jnp.concatenate(steps, axis=1))
  np.testing.assert_allclose(cached[real], np.asarray(full)[real], atol=ATOL, rtol=0)

  with pytest.raises(ValueError, match="no room"):
    model(ids[:, :1], cache=cache)


def _left_padded_prompts():
  rng = np.random.default_rng(3)
  ids = rng.integers(1, VOCAB, (2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[1, :4] = 0  # Prompts of 9 and 5 tokens.
  ids[mask == 0] = 0
  return ids, mask


def _torch_greedy(torch_model, ids, mask, eos_token_id):
  """transformers' greedy `generate`: the 16 new tokens of each row, pad id 0."""
  with torch.no_grad():
    out = torch_model.generate(
        torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )
  return out[:, ids.shape[1]:].numpy()


def test_greedy_generation_matches_transformers(gqa):
  torch_model, model, _ = gqa
  ids, mask = _left_padded_prompts()
  want = _torch_greedy(torch_model, ids, mask, eos_token_id=None)
  assert want.shape == (2, 16)

  got = generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=16)

  np.testing.assert_array_equal(got, want)
  # Right padding continues each prompt the same way: new tokens follow the pad slots.
  right_ids = np.stack([ids[0], np.roll(ids[1], -4)])
  right_mask = np.stack([mask[0], np.roll(mask[1], -4)])
  right = generate(model, jnp.asarray(right_ids), jnp.asarray(right_mask), max_new_tokens=16)
  np.testing.assert_array_equal(right, want)


def test_generation_pads_after_eos_like_transformers(gqa):
  torch_model, model, _ = gqa
  ids, mask = _left_padded_prompts()
  free = np.asarray(generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=16))
  eos = int(free[0, 3])  # Row 0 ends at step 3 (or earlier if the token came sooner).
  want = _torch_greedy(torch_model, ids, mask, eos_token_id=eos)

  got = np.asarray(
      generate(model, jnp.asarray(ids), jnp.asarray(mask), 16, eos_token_id=eos, pad_token_id=0)
  )

  # transformers stops once every row has ended; our rows stay padded to the full length.
  np.testing.assert_array_equal(got[:, : want.shape[1]], want)
  np.testing.assert_array_equal(got[:, want.shape[1]:], 0)
  end = list(got[0]).index(eos)
  assert (got[0, end + 1 :] == 0).all()


def test_loads_sharded_safetensors(tmp_path):
  torch.manual_seed(0)
  torch_model = transformers.LlamaForCausalLM(_hf_config()).eval()
  torch_model.save_pretrained(tmp_path, max_shard_size="50KB")
  assert os.path.isfile(tmp_path / torch_io.SAFETENSORS_INDEX)

  model = _load(tmp_path)

  ids = np.random.default_rng(4).integers(0, VOCAB, (1, 6))
  np.testing.assert_allclose(
      model(jnp.asarray(ids))[0], _torch_logits(torch_model, ids), atol=ATOL, rtol=0
  )


def test_loads_pytorch_bin_with_inv_freq_buffers(tmp_path):
  torch.manual_seed(0)
  torch_model = transformers.LlamaForCausalLM(_hf_config()).eval()
  torch_model.config.save_pretrained(tmp_path)
  state = dict(torch_model.state_dict())
  # transformers < 4.31 saved the rotary buffers with the weights.
  state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
  torch.save(state, tmp_path / torch_io.TORCH_SINGLE)

  model = _load(tmp_path)

  ids = np.random.default_rng(5).integers(0, VOCAB, (1, 6))
  np.testing.assert_allclose(
      model(jnp.asarray(ids))[0], _torch_logits(torch_model, ids), atol=ATOL, rtol=0
  )


def test_tied_embeddings(tmp_path):
  torch_model = _save(tmp_path, tie_word_embeddings=True)
  assert "lm_head.weight" not in load_file(tmp_path / torch_io.SAFETENSORS_SINGLE)

  model = _load(tmp_path)

  assert not hasattr(model, "lm_head")
  ids = np.random.default_rng(6).integers(0, VOCAB, (1, 6))
  np.testing.assert_allclose(
      model(jnp.asarray(ids))[0], _torch_logits(torch_model, ids), atol=ATOL, rtol=0
  )


def test_larger_vocab_keeps_its_extra_rows(gqa):
  torch_model, _, path = gqa
  cfg = llm_config_from_hf(torch_io.read_config_json(str(path)))
  model = LlamaForCausalLM(cfg, vocab_size=VOCAB + 3, rngs=nnx.Rngs(1))
  extra_rows = np.asarray(model.model.embed_tokens.embedding[...])[VOCAB:]

  load_llama(model, str(path))

  np.testing.assert_array_equal(model.model.embed_tokens.embedding[...][VOCAB:], extra_rows)
  ids = np.random.default_rng(7).integers(0, VOCAB, (1, 6))
  logits = model(jnp.asarray(ids))[0]
  assert logits.shape == (1, 6, VOCAB + 3)
  want = _torch_logits(torch_model, ids)
  np.testing.assert_allclose(logits[..., :VOCAB], want, atol=ATOL, rtol=0)


def test_missing_tensor_is_named(tmp_path):
  _save(tmp_path)
  weights = tmp_path / torch_io.SAFETENSORS_SINGLE
  tensors = load_file(weights)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, weights)

  with pytest.raises(torch_io.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    _load(tmp_path)


def test_config_mismatch_names_the_field(gqa):
  _, _, path = gqa
  hf = torch_io.read_config_json(str(path))
  cfg = dict(llm_config_from_hf(hf), hidden_size=32, head_dim=8)
  with pytest.raises(ValueError, match="hidden_size"):
    load_llama(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), str(path))
  with pytest.raises(ValueError, match="rope_theta"):
    check_llm_config(dict(llm_config_from_hf(hf), rope_theta=1e4), hf)


def test_hf_config_fields_and_defaults():
  old_style = {  # lmsys/vicuna-7b-v1.5 config.json (transformers 4.x): no kv heads, no head_dim.
      "architectures": ["LlamaForCausalLM"],
      "hidden_act": "silu",
      "hidden_size": 4096,
      "intermediate_size": 11008,
      "max_position_embeddings": 4096,
      "num_attention_heads": 32,
      "num_hidden_layers": 32,
      "rms_norm_eps": 1e-05,
      "rope_scaling": None,
      "tie_word_embeddings": False,
      "vocab_size": 32000,
  }
  full = dict(config_lib.load_config("unires_pp_7b").model.llm)
  # The attention implementation and the adapters are ours to choose, not the checkpoint's.
  assert llm_config_from_hf(old_style) == {k: v for k, v in full.items()
                                           if k not in ("attention", "lora")}
  check_llm_config(full, old_style)
  with pytest.raises(ValueError, match="rope_type"):
    llm_config_from_hf(dict(old_style, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
  with pytest.raises(ValueError, match="mlp_bias"):
    llm_config_from_hf(dict(old_style, mlp_bias=True))


def test_argument_errors():
  cfg = config_lib.load_config("tiny").model.llm
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  ids = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="exactly one"):
    model(ids, inputs_embeds=model.embed(ids))
  with pytest.raises(ValueError, match="exactly one"):
    model()
  with pytest.raises(ValueError, match="num_kv_heads"):
    LlamaForCausalLM(dict(cfg, num_kv_heads=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'rope_theta'"):
    LlamaForCausalLM({k: v for k, v in cfg.items() if k != "rope_theta"}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config\.model\.llm\.attention .*'flash'"):
    LlamaForCausalLM(dict(cfg, attention="flash"), rngs=nnx.Rngs(0))


def test_every_parameter_has_one_logical_name_per_dimension():
  model = LlamaForCausalLM(config_lib.load_config("tiny").model.llm, rngs=nnx.Rngs(0))
  names = {path: var.out_sharding for path, var in torch_io.iter_params(model)}
  for path, var in torch_io.iter_params(model):
    assert len(names[path]) == var[...].ndim, path
  assert names["model/embed_tokens/embedding"] == ("vocab", "embed")
  assert names["model/layers/0/self_attn/q_proj/kernel"] == ("embed", "heads")
  assert names["model/layers/1/self_attn/v_proj/kernel"] == ("embed", "kv_heads")
  assert names["model/layers/0/self_attn/o_proj/kernel"] == ("heads", "embed")
  assert names["model/layers/0/mlp/down_proj/kernel"] == ("mlp", "embed")
  assert names["model/layers/0/post_attention_layernorm/scale"] == ("embed",)
  assert names["lm_head/kernel"] == ("embed", "vocab")


def test_scanned_parameters_are_the_unrolled_ones_stacked_on_a_layers_axis():
  cfg = config_lib.load_config("tiny").model.llm
  unrolled = dict(torch_io.iter_params(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
  scanned = dict(torch_io.iter_params(LlamaForCausalLM(cfg, scan_layers=True, rngs=nnx.Rngs(0))))
  kernel = scanned["model/layers/self_attn/q_proj/kernel"]
  assert kernel.out_sharding == ("layers", "embed", "heads")
  assert kernel[...].shape == (cfg.num_layers, cfg.hidden_size, cfg.num_heads * cfg.head_dim)
  assert len(scanned) == len(unrolled) - (cfg.num_layers - 1) * 9  # 9 parameters per layer
  for path, var in scanned.items():
    assert len(var.out_sharding) == var[...].ndim, path
    if "/layers/" not in path:
      np.testing.assert_array_equal(var[...], unrolled[path][...], err_msg=path)
      continue
    for i in range(cfg.num_layers):  # the same initial values as unrolled, same rngs
      np.testing.assert_array_equal(var[i], unrolled[path.replace("layers/", f"layers/{i}/")][...])


def test_full_config_parameter_count_equals_vicuna_7b():
  llm = config_lib.load_config("unires_pp_7b").model.llm
  with torch.device("meta"):
    torch_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=llm.vocab_size,
            hidden_size=llm.hidden_size,
            intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads,
            num_key_value_heads=llm.num_kv_heads,
            max_position_embeddings=llm.max_position_embeddings,
            rms_norm_eps=llm.rms_norm_eps,
        )
    )
  want = sum(p.numel() for p in torch_model.parameters())

  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(llm, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(abstract, nnx.Param))

  assert all(isinstance(p, jax.ShapeDtypeStruct) for p in params)
  assert sum(int(np.prod(p.shape)) for p in params) == want


@pytest.mark.parametrize("tied,scan_layers", [(False, False), (True, False), (False, True)])
def test_export_loads_in_transformers_and_round_trips(tmp_path, tied, scan_layers):
  cfg = llm_config_from_hf(
      _hf_config(num_key_value_heads=2, tie_word_embeddings=tied).to_dict())
  model = LlamaForCausalLM(cfg, scan_layers=scan_layers, rngs=nnx.Rngs(1))
  out = tmp_path / "llm"
  save_llama(model, str(out))
  torch_model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
  np.testing.assert_allclose(
      _torch_logits(torch_model, ids), np.asarray(_run(model, ids)[0]), atol=ATOL)
  # other initial values, overwritten by the import
  back = LlamaForCausalLM(cfg, scan_layers=scan_layers, rngs=nnx.Rngs(2))
  load_llama(back, str(out))
  imported = dict(torch_io.iter_params(back))
  for path, var in torch_io.iter_params(model):
    np.testing.assert_array_equal(np.asarray(imported[path][...]), np.asarray(var[...]),
                                  err_msg=path)


def test_export_refuses_an_existing_directory_and_leaves_no_partial_output(tmp_path):
  model = LlamaForCausalLM(llm_config_from_hf(_hf_config().to_dict()), rngs=nnx.Rngs(0))
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="already exists"):
    save_llama(model, str(existing))
  assert os.listdir(existing) == ["keep.txt"]
  with pytest.raises(SafetensorError, match="object"):  # a failure halfway through the write
    torch_io.write_model_dir(str(tmp_path / "broken"), {}, {"w": np.array([object()])})
  assert sorted(os.listdir(tmp_path)) == ["existing"]


def _padded_ids():
  """Three rows of 9 tokens: unpadded, left-padded (3 pads), right-padded (4 pads)."""
  ids = np.random.default_rng(8).integers(0, VOCAB, (3, 9))
  mask = np.ones((3, 9), np.int64)
  mask[1, :3] = mask[2, 5:] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


def _loss_and_grads(model, ids, mask):
  """Jitted in the caller's `llm_attention.testing` context: the squared logits of the real
  tokens, summed, and their gradients with respect to every parameter."""
  graphdef, state = nnx.split(model)

  def loss(state):
    logits = nnx.merge(graphdef, state)(ids, attention_mask=mask)[0]
    return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return value, logits, grads


@pytest.mark.parametrize("attention", ["splash", "cudnn"])
def test_attention_kernels_match_xla_and_transformers(gqa, attention):
  """Splash in the Pallas interpreter and the cudnn path through `jax.nn`'s XLA implementation
  (same arguments as on a GPU): the real tokens' logits match transformers and the "xla"
  einsum, and so do the gradients, with left and right padding."""
  torch_model, model, path = gqa
  kernel_model = _load(path, attention=attention, scan_layers=model.model.scan_layers)
  ids, mask = _padded_ids()
  with llm_attention.testing(cudnn_implementation="xla", splash_interpret=True):
    got = _loss_and_grads(kernel_model, ids, mask)
  want = _loss_and_grads(model, ids, mask)

  real = np.asarray(mask, bool)
  logits = np.asarray(got[1])[real]
  np.testing.assert_allclose(logits, np.asarray(want[1])[real], atol=ATOL, rtol=0)
  np.testing.assert_allclose(logits, _torch_logits(torch_model, np.asarray(ids),
                                                   np.asarray(mask))[real], atol=ATOL, rtol=0)
  # float32: the gradients agree to rounding, 1e-5 of each array's largest entry.
  for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
    np.testing.assert_allclose(g, w, atol=1e-5 * float(np.abs(w).max()), rtol=0)


@pytest.mark.parametrize("attention,platform", [("cudnn", "gpu"), ("splash", "tpu")])
def test_kernel_outside_its_platform_names_the_config_field(gqa, attention, platform):
  _, model, path = gqa
  kernel_model = _load(path, attention=attention, scan_layers=model.model.scan_layers)
  with pytest.raises(ValueError, match=rf"config\.model\.llm\.attention='{attention}' runs on "
                     rf"{platform} only; this program is traced for 'cpu'"):
    kernel_model(jnp.zeros((1, 4), jnp.int32))


def test_generation_with_a_kernel_runs_the_einsum(gqa):
  """Splash and cudnn have no cache path: generation (prefill and steps through the KV cache)
  runs the "xla" einsum on any platform, here the CPU, outside `llm_attention.testing`."""
  torch_model, model, path = gqa
  ids, mask = _left_padded_prompts()
  want = _torch_greedy(torch_model, ids, mask, eos_token_id=None)
  kernel_model = _load(path, attention="splash", scan_layers=model.model.scan_layers)

  got = generate(kernel_model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=16)

  np.testing.assert_array_equal(got, want)
