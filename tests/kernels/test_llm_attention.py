"""The LLM attention dispatch (`config.model.llm.attention`): splash blocks, the field check, and
the LLaMA forward and backward with splash attention compiled for a TPU slice on this host.

Numerical parity of the kernels with the "xla" einsum (Pallas interpreter, `jax.nn`'s XLA
implementation) is tested on the model, in tests/models/test_llama.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from unires_jax import config_lib, parallel
from unires_jax.kernels import llm_attention
from unires_jax.models.llama import LlamaForCausalLM

# By path: the TPU venv need not see the package's installed configs.
TINY = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "tiny.py")


def test_splash_block_tiles_the_sequence_rounded_up_to_128():
  assert llm_attention.splash_block(9) == 128
  assert llm_attention.splash_block(738) == 256   # the 7B config's sequence, padded to 768
  assert llm_attention.splash_block(1024) == 512
  assert llm_attention.splash_block(2048) == 512
  assert llm_attention.splash_block(640) == 128


def test_unknown_implementation_names_the_field():
  with pytest.raises(ValueError, match=r"config\.model\.llm\.attention must be one of "
                     r"\('xla', 'cudnn', 'splash'\), got 'flash'"):
    llm_attention.check("flash")


def _compile_llama_step(attention: str, length: int):
  """The loss and gradients of a 1-layer bfloat16 LLaMA (4 query heads, 2 key/value heads of
  128) on 4 sequences of `length`, compiled for v5p:2x2x1 with fsdp = tensor = 2: rows split
  over data x fsdp, heads over tensor."""
  from unires_jax.train import aot  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(TINY)
  config.mesh.update(data=1, fsdp=2, tensor=2)
  mesh = aot.topology_mesh("v5p:2x2x1", config.mesh)
  rules = parallel.rules_from_config(config)
  cfg = dict(config.model.llm, attention=attention, hidden_size=256, num_heads=4,
             num_kv_heads=2, head_dim=128, num_layers=1, max_position_embeddings=length)
  model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                       parallel.state_shardings(state, mesh, rules))
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  ids = jax.ShapeDtypeStruct((4, length), jnp.int32, sharding=rows)

  def loss(state, ids, mask):
    logits = nnx.merge(graphdef, state)(ids, attention_mask=mask)[0].astype(jnp.float32)
    return jnp.mean(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2)

  step = parallel.on_mesh(mesh, rules, jax.jit(jax.value_and_grad(loss)))
  return step.lower(state, ids, ids).compile()


@pytest.mark.slow
def test_splash_compiles_for_a_v5p_slice_and_needs_less_memory_than_the_einsum():
  pytest.importorskip("libtpu")
  splash = _compile_llama_step("splash", 2048)
  einsum = _compile_llama_step("xla", 2048)

  # The Mosaic kernels: the forward and the fused backward of the one layer.
  assert splash.as_text().count("tpu_custom_call") == 2
  assert "tpu_custom_call" not in einsum.as_text()
  # Per chip, 2 rows of 2048 tokens and 2 query heads: one float32 `[2, 2, 2048, 2048]` array
  # of the einsum's scores is 64 MiB; the kernel materialises none. Measured with libtpu
  # 0.0.42.1: 17.5 MiB of temp memory for splash, 61.1 MiB for the einsum (at 1024 tokens,
  # 9.1 against 13.9: the shortest sequence that shows it clearly is about 2048).
  splash_temp = splash.memory_analysis().temp_size_in_bytes
  einsum_temp = einsum.memory_analysis().temp_size_in_bytes
  assert splash_temp < 0.5 * einsum_temp, (splash_temp, einsum_temp)


def test_splash_per_device_on_a_mesh_matches_the_einsum():
  """On 8 CPU devices (data = fsdp = tensor = 2), splash in the Pallas interpreter runs per
  device on 1 of the 4 rows and 2 of the 4 query heads with their key/value head: the real tokens'
  logits equal the einsum's on the same mesh."""
  config = config_lib.load_config(TINY)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_from_config(config)
  ids = jax.random.randint(jax.random.key(0), (4, 9), 0, config.model.llm.vocab_size)
  mask = jnp.ones((4, 9), jnp.int32).at[1, :3].set(0).at[2, 5:].set(0)

  def logits(attention):
    model = LlamaForCausalLM(dict(config.model.llm, attention=attention), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    run = parallel.on_mesh(mesh, rules, jax.jit(
        lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask)[0]))
    return run(state, ids, mask)

  with llm_attention.testing(splash_interpret=True):
    got = logits("splash")
  want = logits("xla")
  real = mask.astype(bool)
  # float32: rounding of a 2-layer, 64-wide model.
  np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
