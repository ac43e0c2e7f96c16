"""Inference reads a checkpoint's float32 parameters in the compute dtype (`inference_config`):
a bfloat16 model holds half the bytes on the device and segments as the float32-held one does."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unires_jax import checkpoint, inference, models, parallel
from unires_jax.config_lib import load_config
from unires_jax.data import tokenizer

TEXT = "the red cup"


def test_a_bfloat16_model_reads_float32_weights_as_bfloat16(tmp_path):
  config = load_config("tiny")
  config.model.dtype = "bfloat16"  # float32 master weights, bfloat16 compute: the 7B recipe's
  tok = str(tmp_path / "tokenizer")
  tokenizer.train_tokenizer([*tokenizer.PROMPT_WORDS, TEXT], config.model.llm.vocab_size, tok)
  model = models.build_model(config, nnx.Rngs(0))
  bias = model.no_target_head.fc2.bias  # a confident "target": the masks show
  bias.set_value(bias.get_value() - 10.0)
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  checkpoint.save_converted(params, config, str(tmp_path / "ckpt"), tokenizer_dir=tok)

  segmenter = inference.Segmenter.from_checkpoint(str(tmp_path / "ckpt"), batch_size=1)
  assert {x.dtype for x in jax.tree.leaves(segmenter.params)} == {jnp.dtype("bfloat16")}

  # Against the float32 parameters restored as they were saved, on the same mesh: half the
  # bytes on the devices, the same verdict and nearly the same mask.
  model32 = parallel.ShardedModel(config, inference.local_mesh())
  params32, _ = checkpoint.restore_params(str(tmp_path / "ckpt"), model32.abstract_sharded())
  assert _device_bytes(segmenter.params) * 2 == _device_bytes(params32)
  held32 = inference.Segmenter(model32, params32, tokenizer.load_tokenize(tok), batch_size=1)
  image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
  (bf16,), (f32,) = segmenter.segment([image], [TEXT]), held32.segment([image], [TEXT])
  assert bf16.no_target == f32.no_target is False
  assert abs(bf16.no_target_prob - f32.no_target_prob) < 0.01
  inter, union = (bf16.mask & f32.mask).sum(), (bf16.mask | f32.mask).sum()
  assert union > 0 and inter / union > 0.97, inter / union


def _device_bytes(params) -> int:
  """Bytes of `params` on all devices together (a replicated array counts once per device)."""
  return sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
