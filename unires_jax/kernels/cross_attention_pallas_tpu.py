"""TPU (Mosaic) kernels of the masked cross-attention: forward, dq, and dk/dv.

Grid (batch, query tiles, key tiles) with the key tiles innermost and sequential: the running max,
sum and output of the online softmax live in VMEM scratch across key tiles, so only one
[block_q, block_k] tile of logits and of scores exists at a time. All heads are handled in one
program (a static loop) because the mask is shared by the heads: each logits tile is read from HBM
once, not once per head.

Tile skipping: the pre-pass flags each (query tile, key tile) with any allowed key. A tile without
one is skipped by `pl.when`, and its index maps point at the last block that was fetched, so the
pipeline issues no DMA for it either (it only copies when a block index changes).

Layouts follow the TPU tiling ((8, 128) for the last two dims of a block): per-query vectors are
stored lane-replicated as [.., queries, 128], per-key vectors sublane-replicated as [.., 8, keys],
block_q is a multiple of 16 (bfloat16 packing) and block_k of 128. Keys and values (and dk, dv)
are [batch, heads, keys, head_dim], or [batch, heads, head_dim, keys] with `keys_minor` (see
`cross_attention_tile`), chosen by the caller.

Keys are not padded to a multiple of block_k: the last key block may run past the end of k and v
(the pipeline reads whatever lies there, and drops the writes of dk, dv beyond it). Those keys are
marked invalid by the (padded) key flags, and their k and v values are zeroed in the tile before
use, so that stale VMEM (NaN included) never meets a zero weight in a matmul.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unires_jax.kernels import cross_attention_tile as tile

LANES = 128
SUBLANES = 8


def fetch_plan(flags: jax.Array) -> jax.Array:
  """Which block to fetch at each step of the last axis so that skipped steps fetch nothing new.

  Args:
    flags: [..., steps] int32, nonzero where the step's tile is computed.

  Returns:
    [..., steps] int32: the step itself where flagged, else the last flagged step before it, or
    the first flagged step when there is none before (so that block is in place when it is
    needed); 0 for rows without any flagged step.
  """
  steps = jnp.arange(flags.shape[-1], dtype=jnp.int32)
  flagged = flags != 0
  last = jax.lax.cummax(jnp.where(flagged, steps, -1), axis=flags.ndim - 1)
  first = jnp.argmax(flagged, axis=-1).astype(jnp.int32)[..., None]
  return jnp.where(last >= 0, last, first)


def _lanes(x: jax.Array) -> jax.Array:
  """[b, ..., n] per-query vector -> [b, ..., n, LANES] lane-replicated."""
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _column(ref, h=None) -> jax.Array:
  """Lane-replicated [block_q, LANES] ref (or head h of [heads, block_q, LANES]) -> [block_q, 1]."""
  x = ref[...] if h is None else ref[h]
  return x[:, :1]


def _tile_mask(logits_ref, threshold_ref, valid_ref) -> jax.Array:
  """[block_q, block_k] bool from the logits tile, the per-query thresholds and the key flags."""
  logits = logits_ref[...]
  # Broadcast the int32 key flags first and compare after: bool vectors are best not broadcast.
  valid = jnp.broadcast_to(valid_ref[:1, :], logits.shape) != 0
  return tile.allowed(logits, _column(threshold_ref), valid)


def _key_tile(ref, h, start, num_keys, keys_minor):
  """Head h of a k or v block, with keys at or beyond num_keys zeroed when the block is ragged.

  Args:
    ref: [heads, block_k, head_dim] (or [heads, head_dim, block_k] when keys_minor) VMEM ref.
    start: the index of the block's first key (traced).
    num_keys: the real number of keys (static).
  """
  x = ref[h]
  axis = 1 if keys_minor else 0
  if num_keys % x.shape[axis] == 0:
    return x
  index = start + jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  return jnp.where(index < num_keys, x, jnp.zeros_like(x))


def _tile_steps(step, num_steps, flags_ref, flag_index, scratch, mask_refs, heads, accumulate,
                store):
  """The skeleton the three kernels share along their sequential (innermost) grid axis.

  Args:
    step, num_steps: this program's position on that axis, and the axis' length.
    flags_ref, flag_index: the pre-pass flags in SMEM and the entry of this program's
      (query tile, key tile); 0 skips the tile.
    scratch: (ref, fill value) of each float32 VMEM accumulator, filled at step 0.
    mask_refs: (logits_ref, threshold_ref, valid_ref), see `_tile_mask`.
    heads: the number of heads, all handled by this program.
    accumulate: accumulate(h, mask) adds head h of the tile; mask [block_q, block_k] bool.
    store: store() writes the outputs from the scratch at the last step.
  """

  @pl.when(step == 0)
  def _init():
    for ref, value in scratch:
      ref[...] = jnp.full(ref.shape, value, jnp.float32)

  @pl.when(flags_ref[flag_index] != 0)
  def _accumulate():
    # The mask is shared by the heads: computed once per tile, not once per head.
    mask = _tile_mask(*mask_refs)
    for h in range(heads):
      accumulate(h, mask)

  pl.when(step == num_steps - 1)(store)


def _forward_kernel(flags_ref, fetch_ref, q_ref, k_ref, v_ref, logits_ref, threshold_ref,
                    valid_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *, scale, num_q, num_k,
                    num_keys, keys_minor):
  b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  del fetch_ref  # used by the index maps only
  start = j * logits_ref.shape[1]

  def accumulate(h, mask):
    s = tile.scores(q_ref[h], _key_tile(k_ref, h, start, num_keys, keys_minor), scale, keys_minor)
    m, l, acc = tile.online_softmax_step(
        s, mask, _column(m_ref, h), _column(l_ref, h), acc_ref[h],
        _key_tile(v_ref, h, start, num_keys, keys_minor), keys_minor)
    m_ref[h] = jnp.broadcast_to(m, m_ref.shape[1:])
    l_ref[h] = jnp.broadcast_to(l, l_ref.shape[1:])
    acc_ref[h] = acc

  def store():
    for h in range(q_ref.shape[0]):
      o, lse = tile.finalize(_column(m_ref, h), _column(l_ref, h), acc_ref[h])
      o_ref[h] = o.astype(o_ref.dtype)
      lse_ref[h] = jnp.broadcast_to(lse, lse_ref.shape[1:])

  _tile_steps(j, num_k, flags_ref, (b * num_q + i) * num_k + j,
              [(m_ref, -jnp.inf), (l_ref, 0.0), (acc_ref, 0.0)],
              (logits_ref, threshold_ref, valid_ref), q_ref.shape[0], accumulate, store)


def _dq_kernel(flags_ref, fetch_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, logits_ref,
               threshold_ref, valid_ref, dq_ref, acc_ref, *, scale, num_q, num_k, num_keys,
               keys_minor):
  b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  del fetch_ref
  start = j * logits_ref.shape[1]

  def accumulate(h, mask):
    k = _key_tile(k_ref, h, start, num_keys, keys_minor)
    s = tile.scores(q_ref[h], k, scale, keys_minor)
    p = tile.probabilities(s, mask, _column(lse_ref, h))
    # do . v has the layout of q . k: `scores` with scale 1.
    dp = tile.scores(do_ref[h], _key_tile(v_ref, h, start, num_keys, keys_minor), 1.0, keys_minor)
    ds = tile.score_grad(p, dp, _column(delta_ref, h))
    acc_ref[h] += scale * tile.weighted_values(ds, k, keys_minor)

  def store():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)

  _tile_steps(j, num_k, flags_ref, (b * num_q + i) * num_k + j, [(acc_ref, 0.0)],
              (logits_ref, threshold_ref, valid_ref), q_ref.shape[0], accumulate, store)


def _dkv_kernel(flags_ref, fetch_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, logits_ref,
                threshold_ref, valid_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, scale, num_q,
                num_k, num_keys, keys_minor):
  b, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  del fetch_ref
  start = j * logits_ref.shape[1]

  def accumulate(h, mask):
    q, do = q_ref[h], do_ref[h]
    s = tile.scores(q, _key_tile(k_ref, h, start, num_keys, keys_minor), scale, keys_minor)
    p = tile.probabilities(s, mask, _column(lse_ref, h))
    dv_acc_ref[h] += tile.key_grad(p, do, keys_minor)
    dp = tile.scores(do, _key_tile(v_ref, h, start, num_keys, keys_minor), 1.0, keys_minor)
    ds = tile.score_grad(p, dp, _column(delta_ref, h))
    dk_acc_ref[h] += scale * tile.key_grad(ds, q, keys_minor)

  def store():
    dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)

  # Query tiles are the sequential axis here; flags stay [batch, query tiles, key tiles].
  _tile_steps(i, num_q, flags_ref, (b * num_q + i) * num_k + j,
              [(dk_acc_ref, 0.0), (dv_acc_ref, 0.0)],
              (logits_ref, threshold_ref, valid_ref), q_ref.shape[0], accumulate, store)


def _key_valid_rows(key_valid: jax.Array) -> jax.Array:
  """[b, keys] bool -> [b, SUBLANES, keys] int32 (a full (8, 128) tile per key block)."""
  return jnp.broadcast_to(key_valid.astype(jnp.int32)[:, None, :],
                          (key_valid.shape[0], SUBLANES, key_valid.shape[1]))


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, flags, fetch, args, *,
          interpret, vmem_limit, name):
  """pallas_call with (flags, fetch) as flattened scalar-prefetch operands in SMEM."""
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=vmem_limit),
      interpret=interpret,
      name=name,
  )(flags.reshape(-1), fetch.reshape(-1), *args)


def _kv_spec(heads, head_dim, block_k, keys_minor, key_block):
  """BlockSpec of k, v, dk or dv: [heads, block_k, head_dim] ([heads, head_dim, block_k] when
  keys_minor) at key block key_block(*grid indices, flags_ref, fetch_ref) of batch row b."""
  if keys_minor:
    return pl.BlockSpec((None, heads, head_dim, block_k),
                        lambda b, *rest: (b, 0, 0, key_block(b, *rest)))
  return pl.BlockSpec((None, heads, block_k, head_dim),
                      lambda b, *rest: (b, 0, key_block(b, *rest), 0))


def _num_keys(k, keys_minor):
  return k.shape[3] if keys_minor else k.shape[2]


def forward(q, k, v, logits, threshold, key_valid, flags, *, scale, block_q, block_k, interpret,
            keys_minor=False, vmem_limit=None):
  """Masked attention on query-block-padded inputs.

  Args:
    q: [batch, heads, queries, head_dim], queries a multiple of block_q.
    k, v: [batch, heads, keys, head_dim], or [batch, heads, head_dim, keys] when keys_minor; keys
      need not be a multiple of block_k.
    logits: [batch, queries, padded keys] float32 mask logits, padded keys = keys rounded up to
      a multiple of block_k.
    threshold: [batch, queries] float32 per-query threshold (see `cross_attention_tile.allowed`).
    key_valid: [batch, padded keys] bool, False beyond the real keys.
    flags: [batch, queries // block_q, padded keys // block_k] int32, nonzero where the tile has
      an allowed key.
    vmem_limit: the kernel's scoped VMEM limit in bytes (None: the compiler's default).

  Returns:
    (out [batch, heads, queries, head_dim] in q's dtype, logsumexp [batch, heads, queries] f32).
  """
  batch, heads, num_queries, head_dim = q.shape
  num_q, num_k = flags.shape[1:]
  fetch = fetch_plan(flags)

  def q_map(b, i, j, flags_ref, fetch_ref):
    return b, 0, i, 0

  def at_k(b, i, j, flags_ref, fetch_ref):
    return fetch_ref[(b * num_q + i) * num_k + j]

  q_spec = pl.BlockSpec((None, heads, block_q, head_dim), q_map)
  kv_spec = _kv_spec(heads, head_dim, block_k, keys_minor, at_k)
  column_spec = pl.BlockSpec((None, heads, block_q, LANES), q_map)
  in_specs = [
      q_spec, kv_spec, kv_spec,
      pl.BlockSpec((None, block_q, block_k), lambda b, i, *r: (b, i, at_k(b, i, *r))),
      pl.BlockSpec((None, block_q, LANES), lambda b, i, j, *_: (b, i, 0)),
      pl.BlockSpec((None, SUBLANES, block_k), lambda b, i, *r: (b, 0, at_k(b, i, *r))),
  ]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, heads, num_queries, LANES), jnp.float32)]
  scratch = [pltpu.VMEM((heads, block_q, LANES), jnp.float32),
             pltpu.VMEM((heads, block_q, LANES), jnp.float32),
             pltpu.VMEM((heads, block_q, head_dim), jnp.float32)]
  kernel = functools.partial(_forward_kernel, scale=scale, num_q=num_q, num_k=num_k,
                             num_keys=_num_keys(k, keys_minor), keys_minor=keys_minor)
  out, lse = _call(
      kernel, (batch, num_q, num_k), in_specs, [q_spec, column_spec], out_shape, scratch, flags,
      fetch, (q, k, v, logits, _lanes(threshold), _key_valid_rows(key_valid)),
      interpret=interpret, vmem_limit=vmem_limit, name="masked_cross_attention_fwd")
  return out, lse[..., 0]


def backward(q, k, v, logits, threshold, key_valid, flags, do, lse, delta, *, scale, block_q,
             block_k, interpret, keys_minor=False, vmem_limit=None):
  """(dq, dk, dv) of `forward` (dk, dv in k's layout); do like q, lse and delta
  [batch, heads, queries] float32."""
  lanes = dict(lse=_lanes(lse), delta=_lanes(delta),
               threshold=_lanes(threshold), valid=_key_valid_rows(key_valid))
  args = (q, k, v, do, lanes["lse"], lanes["delta"], logits, lanes["threshold"], lanes["valid"])
  static = dict(scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
                keys_minor=keys_minor, vmem_limit=vmem_limit)
  dq = _backward_dq(flags, args, **static)
  dk, dv = _backward_dkv(flags, args, **static)
  return dq, dk, dv


def _backward_dq(flags, args, *, scale, block_q, block_k, interpret, keys_minor, vmem_limit):
  """dq [batch, heads, queries, head_dim]: like the forward, key tiles innermost."""
  q, k = args[:2]
  batch, heads, _, head_dim = q.shape
  num_q, num_k = flags.shape[1:]

  def at_k(b, i, j, flags_ref, fetch_ref):
    return fetch_ref[(b * num_q + i) * num_k + j]

  q_spec = pl.BlockSpec((None, heads, block_q, head_dim), lambda b, i, j, *_: (b, 0, i, 0))
  column_spec = pl.BlockSpec((None, heads, block_q, LANES), lambda b, i, j, *_: (b, 0, i, 0))
  kv_spec = _kv_spec(heads, head_dim, block_k, keys_minor, at_k)
  in_specs = [
      q_spec, kv_spec, kv_spec, q_spec, column_spec, column_spec,
      pl.BlockSpec((None, block_q, block_k), lambda b, i, *r: (b, i, at_k(b, i, *r))),
      pl.BlockSpec((None, block_q, LANES), lambda b, i, j, *_: (b, i, 0)),
      pl.BlockSpec((None, SUBLANES, block_k), lambda b, i, *r: (b, 0, at_k(b, i, *r))),
  ]
  kernel = functools.partial(_dq_kernel, scale=scale, num_q=num_q, num_k=num_k,
                             num_keys=_num_keys(k, keys_minor), keys_minor=keys_minor)
  return _call(
      kernel, (batch, num_q, num_k), in_specs, q_spec, jax.ShapeDtypeStruct(q.shape, q.dtype),
      [pltpu.VMEM((heads, block_q, head_dim), jnp.float32)], flags, fetch_plan(flags), args,
      interpret=interpret, vmem_limit=vmem_limit, name="masked_cross_attention_dq")


def _backward_dkv(flags, args, *, scale, block_q, block_k, interpret, keys_minor, vmem_limit):
  """(dk, dv) in k's layout: query tiles innermost; the fetch plan runs along the query axis."""
  q, k, v = args[:3]
  batch, heads, _, head_dim = q.shape
  num_q, num_k = flags.shape[1:]
  fetch_q = fetch_plan(flags.transpose(0, 2, 1))

  def at_q(b, j, i, fetch_ref):
    return fetch_ref[(b * num_k + j) * num_q + i]

  q_spec = pl.BlockSpec((None, heads, block_q, head_dim),
                        lambda b, j, i, _, fe: (b, 0, at_q(b, j, i, fe), 0))
  column_spec = pl.BlockSpec((None, heads, block_q, LANES),
                             lambda b, j, i, _, fe: (b, 0, at_q(b, j, i, fe), 0))
  kv_spec = _kv_spec(heads, head_dim, block_k, keys_minor, lambda b, j, i, *_: j)
  in_specs = [
      q_spec, kv_spec, kv_spec, q_spec, column_spec, column_spec,
      pl.BlockSpec((None, block_q, block_k), lambda b, j, i, _, fe: (b, at_q(b, j, i, fe), j)),
      pl.BlockSpec((None, block_q, LANES), lambda b, j, i, _, fe: (b, at_q(b, j, i, fe), 0)),
      pl.BlockSpec((None, SUBLANES, block_k), lambda b, j, i, *_: (b, 0, j)),
  ]
  kv_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v)]
  scratch = [pltpu.VMEM(kv_spec.block_shape[1:], jnp.float32)] * 2
  kernel = functools.partial(_dkv_kernel, scale=scale, num_q=num_q, num_k=num_k,
                             num_keys=_num_keys(k, keys_minor), keys_minor=keys_minor)
  # The kernel reads flags as [batch, query tiles, key tiles] whatever the grid order.
  return _call(
      kernel, (batch, num_k, num_q), in_specs, [kv_spec, kv_spec], kv_shapes, scratch, flags,
      fetch_q, args, interpret=interpret, vmem_limit=vmem_limit,
      name="masked_cross_attention_dkv")
