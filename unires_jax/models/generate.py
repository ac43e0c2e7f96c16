"""Greedy decoding with the LLaMA KV cache: one prefill, then one token per `fori_loop` step."""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unires_jax.models.llama import LlamaForCausalLM


def generate(
    model: LlamaForCausalLM,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> jax.Array:
  """Greedy continuation of a (left- or right-) padded batch of prompts.

  Args:
    model: the decoder.
    input_ids: `[b, t]` prompt tokens.
    attention_mask: `[b, t]`, 1 for prompt tokens, 0 for padding.
    max_new_tokens: number of tokens to generate per row.
    eos_token_id: id(s) that end a row; later tokens of that row are `pad_token_id`.
    pad_token_id: filler after a row's end.

  Returns:
    `[b, max_new_tokens]` int32 new tokens.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
    raise ValueError(
        f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be "
        "[batch, tokens]"
    )
  eos = () if eos_token_id is None else tuple(int(i) for i in np.atleast_1d(eos_token_id))
  graphdef, state = nnx.split(model)
  return _generate(
      graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask),
      max_new_tokens=max_new_tokens, eos=eos, pad=pad_token_id,
  )


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "eos", "pad"))
def _generate(graphdef, state, input_ids, attention_mask, *, max_new_tokens, eos, pad):
  model = nnx.merge(graphdef, state)
  b, t = input_ids.shape
  # The last generated token is returned, never fed back: it needs no slot.
  cache = model.init_cache(b, t + max_new_tokens - 1)
  logits, _, cache = model(input_ids, attention_mask=attention_mask, cache=cache)
  # The prompt's last real token (the last column for left padding).
  last = t - 1 - jnp.argmax(attention_mask[:, ::-1] != 0, axis=-1)
  token = jnp.argmax(logits[jnp.arange(b), last], axis=-1).astype(jnp.int32)

  def is_eos(tok):
    return jnp.isin(tok, jnp.asarray(eos, jnp.int32)) if eos else jnp.zeros_like(tok, bool)

  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)
  done = is_eos(token)

  def step(i, carry):
    out, done, cache = carry
    previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
    logits, _, cache = model(previous, cache=cache)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    token = jnp.where(done, pad, token)
    return out.at[:, i].set(token), done | is_eos(token), cache

  out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, done, cache))
  return out
