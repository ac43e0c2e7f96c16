"""GPU (Pallas on Triton) kernels of the masked cross-attention: forward, dq, and dk/dv.

One program per (head, key split, query tile, batch row) loops over its range of key tiles with the
online softmax in registers (Triton programs cannot carry state across grid steps, unlike TPU).
With a few hundred queries at most, (heads x query tiles x batch) can be fewer programs than the
GPU has SMs, so the keys are split into `k_splits` ranges whose partial outputs are merged by
their logsumexp afterwards (flash-decoding). Heads are the fastest grid axis: the programs of the
heads of one query tile run side by side and read the same logits tiles, which then come from L2.

Tile skipping: a key tile whose pre-pass flag is 0 (no allowed key for any query of the tile) is
passed over by `lax.cond` without loading anything. All loaded blocks have power-of-two shapes
(block_q, block_k, head_dim padded by the caller), as Triton requires.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from unires_jax.kernels import cross_attention_tile as tile


def _key_tile(j, block_k):
  return pl.ds(pl.multiple_of(j * block_k, block_k), block_k)


def _forward_kernel(q_ref, k_ref, v_ref, logits_ref, threshold_ref, valid_ref, flags_ref, o_ref,
                    lse_ref, *, scale, block_k, tiles_per_split):
  first = pl.program_id(1) * tiles_per_split
  last = jnp.minimum(first + tiles_per_split, flags_ref.shape[0])
  q = q_ref[...]
  threshold = threshold_ref[...][:, None]

  def step(j, carry):
    def accumulate(carry):
      keys = _key_tile(j, block_k)
      mask = tile.allowed(logits_ref[:, keys], threshold, (valid_ref[keys] != 0)[None, :])
      s = tile.scores(q, k_ref[keys, :], scale)
      return tile.online_softmax_step(s, mask, *carry, v_ref[keys, :])
    return jax.lax.cond(flags_ref[j] != 0, accumulate, lambda c: c, carry)

  block_q, head_dim = q_ref.shape
  init = (jnp.full((block_q, 1), -jnp.inf, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))
  m, l, acc = jax.lax.fori_loop(first, last, step, init)
  o, lse = tile.finalize(m, l, acc)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, logits_ref, threshold_ref,
               valid_ref, flags_ref, dq_ref, *, scale, block_k, tiles_per_split):
  first = pl.program_id(1) * tiles_per_split
  last = jnp.minimum(first + tiles_per_split, flags_ref.shape[0])
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  threshold = threshold_ref[...][:, None]

  def step(j, acc):
    def accumulate(acc):
      keys = _key_tile(j, block_k)
      mask = tile.allowed(logits_ref[:, keys], threshold, (valid_ref[keys] != 0)[None, :])
      k = k_ref[keys, :]
      p = tile.probabilities(tile.scores(q, k, scale), mask, lse)
      ds = tile.score_grad(p, tile.dot_nt(do, v_ref[keys, :]), delta)
      return acc + scale * jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    return jax.lax.cond(flags_ref[j] != 0, accumulate, lambda a: a, acc)

  dq = jax.lax.fori_loop(first, last, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, logits_ref, threshold_ref,
                valid_ref, flags_ref, dk_ref, dv_ref, *, scale, block_q):
  k, v = k_ref[...], v_ref[...]
  valid = (valid_ref[...] != 0)[None, :]

  def step(i, carry):
    def accumulate(carry):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[rows, :], do_ref[rows, :]
      mask = tile.allowed(logits_ref[rows, :], threshold_ref[rows][:, None], valid)
      p = tile.probabilities(tile.scores(q, k, scale), mask, lse_ref[rows][:, None])
      dv = dv + jax.lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
      ds = tile.score_grad(p, tile.dot_nt(do, v), delta_ref[rows][:, None])
      dk = dk + scale * jax.lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
      return dk, dv
    return jax.lax.cond(flags_ref[i] != 0, accumulate, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, flags_ref.shape[0], step, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _merge_splits(o_parts, lse_parts, dtype):
  """Partial results over key ranges -> the full softmax.

  Args:
    o_parts: [splits, batch, heads, queries, head_dim] normalised within each range.
    lse_parts: [splits, batch, heads, queries] logsumexp within each range (-inf: none allowed).

  Returns:
    (out [batch, heads, queries, head_dim] in dtype, logsumexp [batch, heads, queries]).
  """
  if o_parts.shape[0] == 1:
    return o_parts[0].astype(dtype), lse_parts[0]
  top = jnp.max(lse_parts, axis=0)
  shift = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(lse_parts - shift)
  total = jnp.sum(weights, axis=0)
  nonempty = total > 0
  total_safe = jnp.where(nonempty, total, 1.0)
  out = jnp.sum(weights[..., None] * o_parts, axis=0) / total_safe[..., None]
  return out.astype(dtype), jnp.where(nonempty, shift + jnp.log(total_safe), -jnp.inf)


def _split_dtype(x, k_splits):
  """Partial results are float32 when they are merged afterwards, else the final dtype."""
  return x.dtype if k_splits == 1 else jnp.float32


def forward(q, k, v, logits, threshold, key_valid, flags, *, scale, block_q, block_k, k_splits,
            num_warps, num_stages, interpret):
  """Masked attention on block-padded inputs; arguments as in `cross_attention_pallas_tpu.forward`.

  Returns:
    (out [batch, heads, queries, head_dim] in q's dtype, logsumexp [batch, heads, queries] f32).
  """
  batch, heads, num_queries, head_dim = q.shape
  num_keys = k.shape[2]
  num_q, num_k = flags.shape[1:]
  tiles_per_split = pl.cdiv(num_k, k_splits)
  in_specs = [
      pl.BlockSpec((None, None, block_q, head_dim), lambda h, s, i, b: (b, h, i, 0)),
      pl.BlockSpec((None, None, num_keys, head_dim), lambda h, s, i, b: (b, h, 0, 0)),
      pl.BlockSpec((None, None, num_keys, head_dim), lambda h, s, i, b: (b, h, 0, 0)),
      pl.BlockSpec((None, block_q, num_keys), lambda h, s, i, b: (b, i, 0)),
      pl.BlockSpec((None, block_q), lambda h, s, i, b: (b, i)),
      pl.BlockSpec((None, num_keys), lambda h, s, i, b: (b, 0)),
      pl.BlockSpec((None, None, num_k), lambda h, s, i, b: (b, i, 0)),
  ]
  out_specs = [
      pl.BlockSpec((None, None, None, block_q, head_dim), lambda h, s, i, b: (s, b, h, i, 0)),
      pl.BlockSpec((None, None, None, block_q), lambda h, s, i, b: (s, b, h, i)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((k_splits, *q.shape), _split_dtype(q, k_splits)),
      jax.ShapeDtypeStruct((k_splits, batch, heads, num_queries), jnp.float32),
  ]
  o_parts, lse_parts = pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, block_k=block_k,
                        tiles_per_split=tiles_per_split),
      grid=(heads, k_splits, num_q, batch),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="masked_cross_attention_fwd",
  )(q, k, v, logits, threshold, key_valid.astype(jnp.int32), flags)
  return _merge_splits(o_parts, lse_parts, q.dtype)


def backward(q, k, v, logits, threshold, key_valid, flags, do, lse, delta, *, scale, block_q,
             block_k, k_splits, num_warps, num_stages, interpret):
  """(dq, dk, dv) of `forward`; do like q, lse and delta [batch, heads, queries] float32."""
  batch, heads, num_queries, head_dim = q.shape
  num_keys = k.shape[2]
  num_q, num_k = flags.shape[1:]
  valid = key_valid.astype(jnp.int32)
  compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)

  # dq: the forward's grid, one partial dq per key split, summed afterwards.
  tiles_per_split = pl.cdiv(num_k, k_splits)
  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda h, s, i, b: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, num_keys, head_dim), lambda h, s, i, b: (b, h, 0, 0))
  row_spec = pl.BlockSpec((None, None, block_q), lambda h, s, i, b: (b, h, i))
  dq_parts = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=block_k,
                        tiles_per_split=tiles_per_split),
      grid=(heads, k_splits, num_q, batch),
      in_specs=[
          q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
          pl.BlockSpec((None, block_q, num_keys), lambda h, s, i, b: (b, i, 0)),
          pl.BlockSpec((None, block_q), lambda h, s, i, b: (b, i)),
          pl.BlockSpec((None, num_keys), lambda h, s, i, b: (b, 0)),
          pl.BlockSpec((None, None, num_k), lambda h, s, i, b: (b, i, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, None, block_q, head_dim),
                             lambda h, s, i, b: (s, b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((k_splits, *q.shape), _split_dtype(q, k_splits)),
      compiler_params=compiler_params,
      interpret=interpret,
      name="masked_cross_attention_dq",
  )(q, k, v, do, lse, delta, logits, threshold, valid, flags)
  dq = jnp.sum(dq_parts, axis=0).astype(q.dtype)

  # dk, dv: one program per (head, key tile, batch row), looping over the few query tiles.
  q_spec = pl.BlockSpec((None, None, num_queries, head_dim), lambda h, j, b: (b, h, 0, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda h, j, b: (b, h, j, 0))
  row_spec = pl.BlockSpec((None, None, num_queries), lambda h, j, b: (b, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, block_q=block_q),
      grid=(heads, num_k, batch),
      in_specs=[
          q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
          pl.BlockSpec((None, num_queries, block_k), lambda h, j, b: (b, 0, j)),
          pl.BlockSpec((None, num_queries), lambda h, j, b: (b, 0)),
          pl.BlockSpec((None, block_k), lambda h, j, b: (b, j)),
          pl.BlockSpec((None, None, num_q), lambda h, j, b: (b, j, 0)),
      ],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=compiler_params,
      interpret=interpret,
      name="masked_cross_attention_dkv",
  )(q, k, v, do, lse, delta, logits, threshold, valid, flags.transpose(0, 2, 1))
  return dq, dk, dv
