"""Pallas fine-grained masked cross-attention: flash-style, TPU and GPU, forward and backward.

Same contract as `cross_attention_ref.masked_cross_attention_ref` (the specification), computed
without any [queries, keys] score or mask array in HBM:

1. Padding: queries and keys are padded to block multiples (and, for Triton, head_dim to a power of
   two); padded keys are marked invalid, padded queries are sliced off the output.
2. Pre-pass (`plan`, plain XLA, O(Q*K) reads but O(Q + tiles) memory): per query, whether any key
   is allowed, encoded as a threshold on the logits (0 = Mask2Former's rule, -inf = the empty-mask
   fallback to every valid key, +inf = padding query); per (query tile, key tile), whether any key
   of the tile is allowed for any query of the tile.
3. Kernels (`cross_attention_pallas_tpu`, `cross_attention_pallas_gpu`): the mask of a tile is
   recomputed from its logits tile, thresholds and key flags; tiles flagged empty are skipped;
   softmax is online over key tiles; the logsumexp is saved for the backward pass.
4. Backward (`jax.custom_vjp`): delta = rowsum(out * d_out) in XLA, then a dq kernel (key tiles
   inner) and a dk/dv kernel (query tiles inner), both recomputing the probabilities from the
   logsumexp. The logits (and key flags) get no gradient, as in the reference.

Interpret mode (`interpret=True`) runs either variant on the CPU.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from unires_jax.kernels import cross_attention_pallas_gpu as gpu
from unires_jax.kernels import cross_attention_pallas_tpu as tpu
from unires_jax.kernels import cross_attention_ref

BACKENDS = ("tpu", "gpu")

# TPU: VMEM budget for the blocks of the largest kernel (dk/dv), under the 16 MiB default scoped
# limit of the smallest TPU generation.
TPU_VMEM_BUDGET = 12 * 2**20
# GPU: aim for about two waves of programs on an H100 (132 SMs) when choosing key splits.
GPU_TARGET_PROGRAMS = 256


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static choices of one call (hashable: a `custom_vjp` non-differentiable argument)."""

  backend: str
  scale: float
  block_q: int
  block_k: int
  interpret: Any           # bool, or `pltpu.InterpretParams` (TPU variant) for the TPU interpreter
  k_splits: int = 1        # GPU only
  num_warps: int = 4       # GPU only
  num_stages: int = 2      # GPU only

  def kernel_kwargs(self) -> dict:
    kw = dict(scale=self.scale, block_q=self.block_q, block_k=self.block_k,
              interpret=self.interpret)
    if self.backend == "gpu":
      kw.update(k_splits=self.k_splits, num_warps=self.num_warps, num_stages=self.num_stages)
    return kw


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _tpu_vmem_bytes(block_q, block_k, heads, head_dim, itemsize):
  """Rough VMEM of the dk/dv kernel: double-buffered blocks, f32 scratch, f32 tile temporaries."""
  kv = heads * block_k * head_dim
  qs = heads * block_q * head_dim
  return (2 * 4 * kv * itemsize      # k, v in; dk, dv out
          + 2 * kv * 4               # dk, dv accumulators
          + 2 * 2 * qs * itemsize    # q, do
          + 2 * block_q * block_k * 4 + 6 * block_q * block_k * 4)  # logits; s, p, dp, ds, ...


def tpu_blocks(num_queries, num_keys, heads, head_dim, itemsize) -> tuple[int, int]:
  """(block_q, block_k) for the TPU kernels.

  block_q: as few query tiles of at most 128 as possible, each a multiple of 16 (bfloat16 packs
  16 rows per vreg), so that Q = 130 pads to 160, not 256. block_k: a multiple of 128 lanes, the
  largest of 512/256/128 whose blocks fit `TPU_VMEM_BUDGET`.
  """
  num_q_tiles = pl.cdiv(num_queries, 128)
  block_q = _round_up(pl.cdiv(num_queries, num_q_tiles), 16)
  max_k = _round_up(num_keys, 128)
  for block_k in (512, 256, 128):
    if block_k <= max_k and _tpu_vmem_bytes(block_q, block_k, heads, head_dim,
                                            itemsize) <= TPU_VMEM_BUDGET:
      return block_q, block_k
  return block_q, 128


def gpu_blocks(num_queries, head_dim) -> tuple[int, int, int]:
  """(block_q, block_k, num_warps) for the Triton kernels, all powers of two, block dims >= 16.

  head_dim is the padded one. The [block_q, block_k] scores and the [block_k, head_dim] dk/dv
  accumulators live in registers, so block_k shrinks as head_dim grows.
  """
  block_q = min(64, max(16, pl.next_power_of_2(num_queries)))
  block_k = 128 if head_dim <= 64 else 64 if head_dim <= 128 else 32
  return block_q, block_k, (4 if head_dim <= 64 else 8)


def gpu_k_splits(batch, heads, num_q_tiles, num_k_tiles) -> int:
  """Key splits so that heads x query tiles x batch x splits reaches `GPU_TARGET_PROGRAMS`."""
  programs = batch * heads * num_q_tiles
  splits = max(1, min(num_k_tiles, pl.cdiv(GPU_TARGET_PROGRAMS, programs)))
  return pl.cdiv(num_k_tiles, pl.cdiv(num_k_tiles, splits))  # no empty split


def platform_backend() -> str:
  """The kernel variant for the default platform; the CPU interprets the TPU one."""
  return "gpu" if jax.default_backend() == "gpu" else "tpu"


def plan(logits, key_valid, num_queries, block_q, block_k):
  """The pre-pass: per-query thresholds and per-tile "any allowed" flags.

  One reduction over the logits, max over each key tile of the valid keys' logits, gives a
  [batch, queries, key tiles] array (K / block_k times smaller than the logits); everything else
  is computed from it. A max-reduce of a select fuses into one pass on every XLA backend, where a
  chain of boolean any-reductions may leave a [queries, keys] bool array behind (it does on CPU).

  Args:
    logits: [batch, queries, keys] float32, block-padded.
    key_valid: [batch, keys] bool, False for padding keys (including the block padding).
    num_queries: the real number of queries; rows beyond it are padding.
    block_q, block_k: the tile sizes.

  Returns:
    threshold: [batch, queries] float32; query i attends to key j iff
      `logits[i, j] >= threshold[i]` and key j is valid (see `cross_attention_tile.allowed`).
    flags: [batch, queries // block_q, keys // block_k] int32, 1 where the tile has an allowed key.
  """
  batch, padded_q, padded_k = logits.shape
  num_k_tiles = padded_k // block_k
  valid = key_valid.reshape(batch, 1, num_k_tiles, block_k)
  tiled = logits.reshape(batch, padded_q, num_k_tiles, block_k)
  # A NaN logit allows nothing (NaN >= 0 is false in the reference); keep it out of the max.
  tile_max = jnp.max(jnp.where(valid & ~jnp.isnan(tiled), tiled, -jnp.inf), axis=-1)  # [b, q, kt]
  tile_has_valid = jnp.any(valid, axis=-1)                            # [b, 1, key tiles]
  has_allowed = jnp.max(tile_max, axis=-1) >= 0                       # [b, q]
  real = jnp.arange(padded_q) < num_queries
  threshold = jnp.where(real, jnp.where(has_allowed, 0.0, -jnp.inf), jnp.inf)
  # A valid logit >= threshold exists in the tile; for threshold -inf that is any valid key.
  row_flags = (tile_max >= threshold[..., None]) & tile_has_valid
  flags = jnp.any(row_flags.reshape(batch, padded_q // block_q, block_q, num_k_tiles), axis=2)
  return threshold.astype(jnp.float32), flags.astype(jnp.int32)


def _kernels(backend):
  return {"tpu": tpu, "gpu": gpu}[backend]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, logits, threshold, key_valid, flags):
  out, _ = _kernels(config.backend).forward(
      q, k, v, logits, threshold, key_valid, flags, **config.kernel_kwargs())
  return out


def _attention_fwd(config, q, k, v, logits, threshold, key_valid, flags):
  out, lse = _kernels(config.backend).forward(
      q, k, v, logits, threshold, key_valid, flags, **config.kernel_kwargs())
  return out, (q, k, v, logits, threshold, key_valid, flags, out, lse)


def _attention_bwd(config, residuals, do):
  q, k, v, logits, threshold, key_valid, flags, out, lse = residuals
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  dq, dk, dv = _kernels(config.backend).backward(
      q, k, v, logits, threshold, key_valid, flags, do, lse, delta, **config.kernel_kwargs())
  return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_to(x: jax.Array, shape: tuple[int, ...], value=0) -> jax.Array:
  """Pad x at the end of each axis up to shape (no copy when already there)."""
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)], constant_values=value)


def _check_blocks(backend, block_q, block_k):
  """Hardware tiling rules (interpret mode has none, so tests may use small blocks)."""
  if backend == "tpu" and (block_q % 16 or block_k % 128):
    raise ValueError(f"TPU blocks must be multiples of (16, 128), got {(block_q, block_k)}")
  if backend == "gpu" and any(b < 16 or b & (b - 1) for b in (block_q, block_k)):
    raise ValueError(f"GPU blocks must be powers of two >= 16, got {(block_q, block_k)}")


def masked_cross_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask_logits: jax.Array,
    key_valid: jax.Array | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
    interpret: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    k_splits: int | None = None,
) -> jax.Array:
  """Masked multi-head cross-attention by the Pallas kernels; the reference's rule exactly.

  Args:
    q: [batch, heads, queries, head_dim].
    k: [batch, heads, keys, head_dim].
    v: [batch, heads, keys, head_dim].
    mask_logits: [batch, queries, keys]; query i attends to key j where the logit is >= 0 (and
      to every valid key when no logit of its row is).
    key_valid: [batch, keys] bool (False = padding), or None.
    scale: score scale; None means 1 / sqrt(head_dim).
    backend: "tpu" (Mosaic) or "gpu" (Triton); None picks the platform's (TPU on the CPU).
    interpret: run the kernels in the Pallas interpreter (True, or `pltpu.InterpretParams` for the
      TPU variant); None means only on the CPU.
    block_q, block_k: tile sizes; None picks `tpu_blocks` / `gpu_blocks`.
    k_splits: GPU key-range splits merged by logsumexp; None picks `gpu_k_splits`.

  Returns:
    [batch, heads, queries, head_dim] in q's dtype.
  """
  key_valid, scale = cross_attention_ref.checked_args(q, k, v, mask_logits, key_valid, scale)
  backend = backend or platform_backend()
  if backend not in BACKENDS:
    raise ValueError(f"unknown Pallas backend {backend!r}; options: {BACKENDS}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  batch, heads, num_q, head_dim = q.shape
  num_k = k.shape[2]

  padded_d = head_dim
  num_warps = 4
  if backend == "tpu":
    default_q, default_k = tpu_blocks(num_q, num_k, heads, head_dim, q.dtype.itemsize)
  else:
    padded_d = max(16, pl.next_power_of_2(head_dim))
    default_q, default_k, num_warps = gpu_blocks(num_q, padded_d)
  block_q, block_k = block_q or default_q, block_k or default_k
  if not interpret:
    _check_blocks(backend, block_q, block_k)
  padded_q, padded_k = _round_up(num_q, block_q), _round_up(num_k, block_k)
  num_q_tiles, num_k_tiles = padded_q // block_q, padded_k // block_k
  if backend == "gpu" and k_splits is None:
    k_splits = gpu_k_splits(batch, heads, num_q_tiles, num_k_tiles)
  config = KernelConfig(backend, float(scale), block_q, block_k, interpret,
                        k_splits=min(k_splits or 1, num_k_tiles), num_warps=num_warps)

  logits = _pad_to(mask_logits.astype(jnp.float32), (batch, padded_q, padded_k))
  key_valid = _pad_to(key_valid, (batch, padded_k), False)
  threshold, flags = jax.lax.stop_gradient(plan(logits, key_valid, num_q, block_q, block_k))
  out = _attention(
      config,
      _pad_to(q, (batch, heads, padded_q, padded_d)),
      _pad_to(k, (batch, heads, padded_k, padded_d)),
      _pad_to(v, (batch, heads, padded_k, padded_d)),
      jax.lax.stop_gradient(logits), threshold, key_valid, flags)
  return out[:, :, :num_q, :head_dim]
