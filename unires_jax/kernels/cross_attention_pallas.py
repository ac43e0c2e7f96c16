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

TPU findings (deviceless compiles with libtpu 0.0.42.1, tests/kernels/test_tpu_compile.py):
* VMEM per TensorCore (JAX's `pltpu.get_tpu_info` table): v4 16 MiB, v5e 128, v5p 64, v6e 128.
  The compiler's default scoped limit is 16 MiB on v5p whatever the chip has; the kernels now ask
  for 3/4 of the chip's VMEM and size block_k to half of that (`tpu_blocks`): at 8 heads,
  head_dim 32 or 64, block_k 1024 on v5p/v5e/v6e and 256 on v4; at head_dim 256 bf16 256 on v5p,
  512 on v5e/v6e, 128 on v4.
* The copies: XLA:TPU's default layout of a [b, h, keys, head_dim] array with head_dim not a
  multiple of 128 has the keys minor ({2,3,1,0}); the kernels wanted head_dim minor, so XLA
  relayouted K and V before every call (and K and V were also padded to block multiples: two more
  copies). At (1, 8, 1, 16384, 64) f32 that was 129 MiB of temp on v5p. The kernels now take K
  and V keys-minor for such head_dim (a free transpose; the blocks are lane-dense too, which is
  what let the dk/dv kernel fit: head_dim 32 or 64 had filled a quarter or half of each VMEM
  tile), and read a ragged last key block in place instead of padding K and V.
"""


import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unires_jax.kernels import cross_attention_pallas_gpu as gpu
from unires_jax.kernels import cross_attention_pallas_tpu as tpu
from unires_jax.kernels import cross_attention_ref

BACKENDS = ("tpu", "gpu")

# TPU VMEM per TensorCore, from JAX's own table (`pltpu.get_tpu_info`, the Pallas "TPU Hardware
# Reference" page): v4 16 MiB, v5e 128 MiB, v5p 64 MiB, v6e 128 MiB. When the target is not known
# at trace time (the CPU, or a deviceless compile traced outside `jax.set_mesh`), the smallest.
TPU_MIN_VMEM = 16 * 2**20
# Of that, the kernels' scoped VMEM limit (the compiler's default is 16 MiB on v4 and v5p, whatever
# the chip has) ...
TPU_VMEM_LIMIT_FRACTION = 0.75
# ... and, of the limit, what the blocks, scratch and tile temporaries that `tpu_vmem_bytes`
# counts may take; the rest is for what Mosaic allocates beyond them.
TPU_BLOCK_FRACTION = 0.5
TPU_BLOCK_K = (1024, 512, 256, 128)
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
  keys_minor: bool = False  # TPU only: k, v as [batch, heads, head_dim, keys]
  vmem_limit: int | None = None  # TPU only: scoped VMEM limit in bytes

  def kernel_kwargs(self) -> dict:
    kw = dict(scale=self.scale, block_q=self.block_q, block_k=self.block_k,
              interpret=self.interpret)
    if self.backend == "tpu":
      kw.update(keys_minor=self.keys_minor, vmem_limit=self.vmem_limit)
    if self.backend == "gpu":
      kw.update(k_splits=self.k_splits, num_warps=self.num_warps, num_stages=self.num_stages)
    return kw


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def tpu_vmem_capacity() -> int:
  """VMEM bytes per TensorCore of the TPU being traced for, or `TPU_MIN_VMEM` if not a TPU.

  The target is the default device, or the device of the abstract mesh set with `jax.set_mesh`
  (how a deviceless compile for a TPU topology names it).
  """
  try:
    return pltpu.get_tpu_info().vmem_capacity_bytes
  except ValueError:  # "Unsupported TPU device kind: cpu"
    return TPU_MIN_VMEM


def tpu_keys_minor(head_dim: int) -> bool:
  """Keys in the lanes ([.., head_dim, keys]) unless head_dim fills whole 128-lane vregs.

  It is also XLA:TPU's default layout of a [batch, heads, keys >= 128, head_dim] array (v4 to
  v6e alike): with it, the kernel's operands are the caller's arrays, not relayouted copies.
  """
  return head_dim % 128 != 0


def default_keys_minor(head_dim: int, interpret: Any) -> bool:
  """`tpu_keys_minor` for the Mosaic kernels (compiled for a TPU); False when interpreting.

  The transpose is free only under XLA:TPU's layouts. In the interpreter (on the CPU) arrays are
  row-major and swapping keys and head_dim copies K and V (and dK and dV back): four K-sized
  buffers that a TPU does not have, in the compiled memory that the tests measure on the CPU.
  """
  return not interpret and tpu_keys_minor(head_dim)


def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
  """VMEM bytes of a [rows, cols] block: (8 x 128) tiles of 32-bit words, 16 rows for 16-bit."""
  return _round_up(rows, 8 * 4 // itemsize) * _round_up(cols, 128) * itemsize


def tpu_vmem_bytes(block_q, block_k, heads, head_dim, itemsize, keys_minor) -> int:
  """VMEM of the largest of the three kernels (the dk/dv one): double-buffered blocks, f32
  scratch, and about eight [block_q, block_k] f32 tile temporaries (logits, mask, s, p, dp, ds,
  and their casts). The fwd and dq kernels hold fewer [.., block_k, ..] blocks."""
  kv_shape = (head_dim, block_k) if keys_minor else (block_k, head_dim)
  kv = heads * _tile_bytes(*kv_shape, itemsize)
  kv_f32 = heads * _tile_bytes(*kv_shape, 4)
  q = heads * _tile_bytes(block_q, head_dim, itemsize)
  columns = heads * _tile_bytes(block_q, 128, 4)
  per_tile = (_tile_bytes(block_q, block_k, 4) + _tile_bytes(block_q, 128, 4)
              + _tile_bytes(8, block_k, 4))  # logits, threshold, key flags
  pipelined = 4 * kv + 2 * q + 2 * columns + per_tile   # k, v, dk, dv; q, do; lse, delta
  return 2 * pipelined + 2 * kv_f32 + 8 * _tile_bytes(block_q, block_k, 4)


def tpu_vmem_limit(capacity: int) -> int:
  """The kernels' scoped VMEM limit for a chip with `capacity` bytes of VMEM per core."""
  return int(capacity * TPU_VMEM_LIMIT_FRACTION)


def tpu_blocks(num_queries, num_keys, heads, head_dim, itemsize,
               vmem_capacity=TPU_MIN_VMEM, keys_minor=None) -> tuple[int, int]:
  """(block_q, block_k) for the TPU kernels on a chip with `vmem_capacity` bytes of VMEM.

  block_q: as few query tiles of at most 128 as possible, each a multiple of 16 (bfloat16 packs
  16 rows per vreg), so that Q = 130 pads to 160, not 256. block_k: a multiple of 128 lanes, the
  largest of `TPU_BLOCK_K` (not beyond the keys) whose `tpu_vmem_bytes` fits the block share of
  the VMEM limit; 128 if none does. keys_minor: the K/V layout; None: `tpu_keys_minor`.
  """
  num_q_tiles = pl.cdiv(num_queries, 128)
  block_q = _round_up(pl.cdiv(num_queries, num_q_tiles), 16)
  budget = TPU_BLOCK_FRACTION * tpu_vmem_limit(vmem_capacity)
  if keys_minor is None:
    keys_minor = tpu_keys_minor(head_dim)
  for block_k in TPU_BLOCK_K:
    if (block_k <= _round_up(num_keys, 128) and
        tpu_vmem_bytes(block_q, block_k, heads, head_dim, itemsize, keys_minor) <= budget):
      return block_q, block_k
  return block_q, TPU_BLOCK_K[-1]


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
  is computed from it. XLA:TPU fuses the select into the reduction. XLA:CPU does not (its YNN
  reduce fusion takes the select's result as an operand), so there the masked [queries, keys]
  f32 array is materialised: in the memory test's shapes (queries <= heads * head_dim) XLA places
  it in a dk/dv output buffer that the backward pass writes later, so it costs no temp there.

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
    keys_minor: bool | None = None,
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
    keys_minor: TPU variant: hand k and v to the kernels as [batch, heads, head_dim, keys];
      None picks `default_keys_minor` (compiled for a TPU, where the transpose is free).

  Returns:
    [batch, heads, queries, head_dim] in q's dtype.
  """
  key_valid, scale = cross_attention_ref.checked_args(q, k, v, mask_logits, key_valid, scale)
  backend = backend or platform_backend()
  if backend not in BACKENDS:
    raise ValueError(f"unknown Pallas backend {backend!r}; options: {BACKENDS}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if backend == "tpu":
    return _tpu_attention(q, k, v, mask_logits, key_valid, scale, interpret, block_q, block_k,
                          keys_minor)
  return _gpu_attention(q, k, v, mask_logits, key_valid, scale, interpret, block_q, block_k,
                        k_splits)


def _plan_inputs(mask_logits, key_valid, num_q, padded_q, padded_k, block_q, block_k):
  """Block-padded logits [b, padded_q, padded_k] f32 and key flags [b, padded_k], the pre-pass'
  threshold [b, padded_q] and tile flags; none of them differentiable."""
  batch = mask_logits.shape[0]
  logits = _pad_to(mask_logits.astype(jnp.float32), (batch, padded_q, padded_k))
  key_valid = _pad_to(key_valid, (batch, padded_k), False)
  threshold, flags = jax.lax.stop_gradient(plan(logits, key_valid, num_q, block_q, block_k))
  return jax.lax.stop_gradient(logits), threshold, key_valid, flags


def _tpu_attention(q, k, v, mask_logits, key_valid, scale, interpret, block_q, block_k,
                   keys_minor):
  """The TPU (Mosaic) variant: q padded to a multiple of block_q; k and v not padded (the
  kernels handle a ragged last key block) and, for head_dim not a multiple of 128, passed as
  [batch, heads, head_dim, keys] (a free transpose of XLA:TPU's default layout, see
  `default_keys_minor`); the logits [batch, queries, keys] and key flags padded to whole tiles."""
  batch, heads, num_q, head_dim = q.shape
  num_k = k.shape[2]
  capacity = tpu_vmem_capacity()
  if keys_minor is None:
    keys_minor = default_keys_minor(head_dim, interpret)
  default_q, default_k = tpu_blocks(num_q, num_k, heads, head_dim, q.dtype.itemsize, capacity,
                                    keys_minor)
  block_q, block_k = block_q or default_q, block_k or default_k
  if not interpret:
    _check_blocks("tpu", block_q, block_k)
  padded_q, padded_k = _round_up(num_q, block_q), _round_up(num_k, block_k)
  config = KernelConfig("tpu", float(scale), block_q, block_k, interpret, keys_minor=keys_minor,
                        vmem_limit=None if interpret else tpu_vmem_limit(capacity))
  logits, threshold, key_valid, flags = _plan_inputs(
      mask_logits, key_valid, num_q, padded_q, padded_k, block_q, block_k)
  k, v = (jnp.swapaxes(x, 2, 3) if keys_minor else x for x in (k, v))
  out = _attention(config, _pad_to(q, (batch, heads, padded_q, head_dim)), k, v,
                   logits, threshold, key_valid, flags)
  return out[:, :, :num_q]


def _gpu_attention(q, k, v, mask_logits, key_valid, scale, interpret, block_q, block_k,
                   k_splits):
  """The GPU (Triton) variant: queries and keys padded to block multiples, head_dim to a power of
  two (at least 16)."""
  batch, heads, num_q, head_dim = q.shape
  num_k = k.shape[2]
  padded_d = max(16, pl.next_power_of_2(head_dim))
  default_q, default_k, num_warps = gpu_blocks(num_q, padded_d)
  block_q, block_k = block_q or default_q, block_k or default_k
  if not interpret:
    _check_blocks("gpu", block_q, block_k)
  padded_q, padded_k = _round_up(num_q, block_q), _round_up(num_k, block_k)
  num_q_tiles, num_k_tiles = padded_q // block_q, padded_k // block_k
  if k_splits is None:
    k_splits = gpu_k_splits(batch, heads, num_q_tiles, num_k_tiles)
  config = KernelConfig("gpu", float(scale), block_q, block_k, interpret,
                        k_splits=min(k_splits, num_k_tiles), num_warps=num_warps)
  logits, threshold, key_valid, flags = _plan_inputs(
      mask_logits, key_valid, num_q, padded_q, padded_k, block_q, block_k)
  out = _attention(
      config,
      _pad_to(q, (batch, heads, padded_q, padded_d)),
      _pad_to(k, (batch, heads, padded_k, padded_d)),
      _pad_to(v, (batch, heads, padded_k, padded_d)),
      logits, threshold, key_valid, flags)
  return out[:, :, :num_q, :head_dim]
