"""The LLM's causal self-attention over whole sequences, by `config.model.llm.attention`.

  "xla":    the einsum with a dense `[b, t, s]` mask in `unires_jax.models.llama.LlamaAttention`;
            every platform, and the only path with a KV cache (generation).
  "cudnn":  `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused attention; GPU
            only.
  "splash": JAX's Pallas TPU splash attention
            (`jax.experimental.pallas.ops.tpu.splash_attention`); TPU only.

A kernel asked for on another platform raises a ValueError naming the config field: there is no
silent fallback. (`testing` lets CPU tests run the same code through `jax.nn`'s XLA
implementation and the Pallas interpreter.)

Padding: `valid` `[b, t]` marks real tokens. A real token attends causally to the real tokens;
a pad token to the pad tokens at or before it (segment ids 1 and 0, so no row is empty and
every output is finite). Real tokens' outputs are the "xla" path's; pads' differ and are
never read by a real token.

Splash under a mesh: the kernel runs per device (`jax.shard_map`) on the device's rows (the
logical axis `activation_batch`) and heads (`heads`, when it divides both the query and the
key/value heads), as `unires_jax.models.layers.batch_local` does (`unires_jax.sharding`); no mesh
axis is named here.
"""

import contextlib
import contextvars
import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from unires_jax import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
FIELD = "config.model.llm.attention"
PLATFORMS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}
SPLASH_BLOCKS = (512, 256, 128)  # largest first; the kernel's key blocks are multiples of 128


def check(name: str) -> str:
  """`name` if it is an implementation, else a ValueError naming the config field."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{FIELD} must be one of {IMPLEMENTATIONS}, got {name!r}")
  return name


@dataclasses.dataclass(frozen=True)
class _Testing:
  cudnn_implementation: str = "cudnn"
  splash_interpret: bool = False


# Context-local (as JAX's own config contexts): a `testing` block changes nothing outside it.
_TESTING: contextvars.ContextVar[_Testing] = contextvars.ContextVar(
    "unires_llm_attention_testing", default=_Testing())


@contextlib.contextmanager
def testing(*, cudnn_implementation: str = "cudnn", splash_interpret: bool = False
            ) -> Iterator[None]:
  """For tests without the hardware: "cudnn" calls `jax.nn.dot_product_attention` with
  `cudnn_implementation` ("xla" runs on the CPU, same arguments) and "splash" runs the kernel in
  the Pallas interpreter; neither checks the platform then. Read when a function is traced:
  trace (a fresh `jit`) inside the context."""
  token = _TESTING.set(_Testing(cudnn_implementation, splash_interpret))
  try:
    yield
  finally:
    _TESTING.reset(token)


def platform() -> str:
  """The platform of the mesh being traced under (a TPU topology compiled on a CPU host says
  "tpu"), else the default backend's."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _require_platform(impl: str) -> None:
  here = platform()
  if here not in PLATFORMS[impl]:
    raise ValueError(f"{FIELD}={impl!r} runs on {PLATFORMS[impl][0]} only; this program is "
                     f"traced for {here!r}: set {FIELD}='xla' (or run on {PLATFORMS[impl][0]})")


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *,
                     impl: str) -> jax.Array:
  """Causal grouped-query attention, scaled by `head_dim ** -0.5`.

  Args:
    q: `[b, t, heads, head_dim]`, rotary embedding applied.
    k: `[b, t, kv_heads, head_dim]`; query head h reads key/value head h // (heads / kv_heads).
    v: `[b, t, kv_heads, head_dim]`.
    valid: `[b, t]` bool, True at real tokens.
    impl: "cudnn" or "splash" (the "xla" einsum lives in the model).

  Returns:
    `[b, t, heads, head_dim]` in q's dtype.
  """
  if check(impl) == "cudnn":
    return _cudnn(q, k, v, valid)
  if impl == "splash":
    return _splash(q, k, v, valid)
  raise ValueError(f"{FIELD}='xla' is the model's einsum, not a kernel here")


def _same_segment(valid: jax.Array) -> jax.Array:
  """`[b, t]` -> `[b, t, t]`: query i and key j are both real or both padding."""
  return valid[:, :, None] == valid[:, None, :]


def _cudnn(q, k, v, valid):
  """cuDNN fused attention: causal, padding as a `[b, 1, t, t]` mask (left and right padding
  alike; sequence lengths would describe right padding only)."""
  implementation = _TESTING.get().cudnn_implementation
  if implementation == "cudnn":
    _require_platform("cudnn")
  dtype = q.dtype
  return jax.nn.dot_product_attention(
      q, k.astype(dtype), v.astype(dtype), mask=_same_segment(valid)[:, None],
      is_causal=True, implementation=implementation)


def splash_block(length: int) -> int:
  """The splash block size for a sequence of `length`: the largest of `SPLASH_BLOCKS` that
  tiles `length` rounded up to 128 (738 -> 256, tiling 768; 2048 -> 512)."""
  padded = -(-length // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
  return next(b for b in SPLASH_BLOCKS if padded % b == 0)


def _splash(q, k, v, valid):
  """The splash kernel per device: on its rows and, where they divide, its heads."""
  interpret = _TESTING.get().splash_interpret
  if not interpret:
    _require_platform("splash")
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, valid)
  rows = sharding.dividing_mesh_axes("activation_batch", q.shape[0]) or None
  heads = sharding.dividing_mesh_axes("heads", q.shape[2], k.shape[2]) or None
  if heads is not None and sharding.mesh_axes("kv_heads") != heads:
    heads = None  # query head h must find its key/value head on the same device
  qkv = PartitionSpec(rows, None, heads, None)
  # check_vma=False: the kernel's pallas_call does not say how its outputs vary over the axes.
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(rows, None)),
                       out_specs=qkv, check_vma=False)(q, k, v, valid)


def _splash_kernel(num_heads: int, length: int, interpret: bool):
  """A splash kernel for `[num_heads, length, head_dim]` queries, causal, fused backward,
  blocks of `splash_block(length)` (`length` is a multiple of it)."""
  b = splash_block(length)
  blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                             block_kv_dkv=b, block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
  return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _to_kernel_layout(x: jax.Array, length: int) -> jax.Array:
  """`[b, t, heads, d]` -> `[b, heads, length, d]`, zero-padded after the sequence."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def _splash_local(q, k, v, valid, *, interpret: bool):
  """One device's splash attention: q `[b, t, heads, d]`, k and v `[b, t, kv_heads, d]`, valid
  `[b, t]` -> `[b, t, heads, d]`. The sequence is padded to a block multiple with padding
  tokens (segment 0, after every real token, so no real query sees them)."""
  _, t, num_heads, head_dim = q.shape
  block = splash_block(t)
  length = -(-t // block) * block
  dtype = q.dtype
  q = _to_kernel_layout(q * jnp.asarray(head_dim**-0.5, dtype), length)
  k = _to_kernel_layout(k.astype(dtype), length)
  v = _to_kernel_layout(v.astype(dtype), length)
  segments = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, length - t)))
  kernel = _splash_kernel(num_heads, length, interpret)
  out = jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=segments, kv=segments))
  return jnp.swapaxes(out[:, :, :t], 1, 2)
