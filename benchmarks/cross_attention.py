r"""Time and memory of the masked cross-attention: Pallas kernel, XLA reference, dense-bias SDPA.

  python benchmarks/cross_attention.py            # the issue's grid, on a GPU or TPU
  python benchmarks/cross_attention.py --quick    # small sizes; runs on a CPU in about a minute

Implementations (all the same rule, `cross_attention_ref.allowed_keys`):
  pallas: `cross_attention_pallas.masked_cross_attention_pallas` (the platform's kernel variant).
  xla:    `cross_attention_ref.masked_cross_attention_ref`.
  dpa:    `jax.nn.dot_product_attention` with the mask as an additive [batch, 1, Q, K] bias built
          from the logits inside the timed step (that bias is the cost of this approach).
  cudnn:  the same with `implementation="cudnn"`, where it compiles (GPU, bf16/fp16).

Masks: each query's mask is a random rectangle of the sqrt(K) x sqrt(K) feature map (Mask2Former
masks are blobs, not noise); `--empty_fraction` of the queries have an empty mask, which makes
every key tile of their query tile live. Time: median of `--iters` runs after compilation.
Memory: XLA's compiled temp + output bytes (`memory_analysis()`), what a step allocates beyond its
inputs. With `--tpu=v5p` (or v4, v5e, v6e; needs libtpu, the jax[tpu] extra) the memory columns
come from a deviceless compile for one chip of that generation, on any host, the Pallas rows
included; otherwise from the local compile. On the CPU the Pallas kernel only runs in the
interpreter, far too slowly for these sizes: its times are skipped unless `--interpret`.
"""

import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from unires_jax.kernels import cross_attention_pallas as cap
from unires_jax.kernels import cross_attention_ref

_QUICK = flags.DEFINE_bool("quick", False, "Small sizes (Q 1, 32; K 1024, 4096; D 64).")
_QUERIES = flags.DEFINE_list("queries", ["1", "32", "128"], "Q values.")
_KEYS = flags.DEFINE_list("keys", ["4096", "16384", "65536"], "K values (squares).")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "256"], "head_dim values.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 8, "Attention heads.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "q, k, v dtype.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed runs per measurement.")
_EMPTY = flags.DEFINE_float("empty_fraction", 0.0, "Fraction of queries with an empty mask.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "On the CPU, run the Pallas rows interpreted.")

_TPU = flags.DEFINE_enum("tpu", None, ["v4", "v5e", "v5p", "v6e"],
                         "Memory columns from a deviceless compile for this TPU generation.")

IMPLS = ("pallas", "xla", "dpa", "cudnn")
TPU_TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def rectangle_logits(rng, batch, num_q, num_k, empty_fraction):
  """[batch, Q, K] logits: +1 inside a random rectangle of the side x side map, -1 outside."""
  side = int(round(num_k**0.5))
  if side * side != num_k:
    raise ValueError(f"K must be a square (a feature map), got {num_k}")
  rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  logits = np.full((batch, num_q, side, side), -1.0, np.float32)
  for b in range(batch):
    for i in range(num_q):
      if rng.random() < empty_fraction:
        continue
      h, w = rng.integers(side // 8, side // 2 + 1, size=2)
      top, left = rng.integers(0, side - h + 1), rng.integers(0, side - w + 1)
      inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
      logits[b, i][inside] = 1.0
  return logits.reshape(batch, num_q, num_k)


def dense_bias_attention(implementation):
  """jax.nn.dot_product_attention with the rule as an additive bias, in our [b, h, n, d] layout."""
  def attend(q, k, v, logits):
    allowed = cross_attention_ref.allowed_keys(logits)[:, None]          # [b, 1, Q, K]
    bias = jnp.where(allowed, 0.0, -1e9).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        *(x.transpose(0, 2, 1, 3) for x in (q, k, v)), bias=bias, implementation=implementation)
    return out.transpose(0, 2, 1, 3)
  return attend


def attention_fn(impl):
  return {
      "pallas": cap.masked_cross_attention_pallas,
      "xla": cross_attention_ref.masked_cross_attention_ref,
      "dpa": dense_bias_attention(None),
      "cudnn": dense_bias_attention("cudnn"),
  }[impl]


def forward_backward(attend):
  """(q, k, v, logits, do) -> (dq, dk, dv) of <attend(q, k, v, logits), do>."""
  def step(q, k, v, logits, do):
    def loss(q, k, v):
      return jnp.vdot(attend(q, k, v, logits).astype(jnp.float32), do.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return step


def tpu_mib(fn, args, generation):
  """Compiled temp + output MiB of jit(fn)(*args) for one chip of a TPU generation (deviceless;
  traced under `jax.set_mesh`, so the Pallas kernels pick that chip's blocks)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topology = topologies.get_topology_desc(platform="tpu",
                                          topology_name=TPU_TOPOLOGIES[generation])
  mesh = jax.sharding.Mesh(topology.devices[:1], ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in args]
  with jax.set_mesh(mesh):
    stats = jax.jit(fn).trace(*specs).lower().compile().memory_analysis()
  return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def measure(fn, args, iters):
  """(median ms, compiled temp + output MiB) of jit(fn)(*args)."""
  compiled = jax.jit(fn).lower(*args).compile()
  stats = compiled.memory_analysis()
  mib = (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), mib


def skipped_tiles(logits, num_q, head_dim, heads, dtype):
  """Fraction of (query tile, key tile) pairs the platform's kernel skips, for the table."""
  batch, _, num_k = logits.shape
  if cap.platform_backend() == "gpu":
    block_q, block_k, _ = cap.gpu_blocks(num_q, max(16, int(2**np.ceil(np.log2(head_dim)))))
  else:
    block_q, block_k = cap.tpu_blocks(num_q, num_k, heads, head_dim, jnp.dtype(dtype).itemsize)
  padded_q, padded_k = -(-num_q // block_q) * block_q, -(-num_k // block_k) * block_k
  padded = jnp.pad(logits, ((0, 0), (0, padded_q - num_q), (0, padded_k - num_k)))
  valid = jnp.arange(padded_k)[None].repeat(batch, 0) < num_k
  _, flags_ = cap.plan(padded, valid, num_q, block_q, block_k)
  return 1.0 - float(jnp.mean(flags_))


def run_config(num_q, num_k, head_dim, rng):
  """One row per implementation: dict(impl, fwd_ms, fb_ms, fwd_mib, fb_mib) or a skip note."""
  dtype = jnp.dtype(_DTYPE.value)
  b, h = _BATCH.value, _HEADS.value
  q, do = (jnp.asarray(rng.normal(size=(b, h, num_q, head_dim)), dtype) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(b, h, num_k, head_dim)), dtype) for _ in range(2))
  logits = jnp.asarray(rectangle_logits(rng, b, num_q, num_k, _EMPTY.value))
  on_cpu = jax.default_backend() == "cpu"
  rows = []
  for impl in IMPLS:
    if impl == "cudnn" and (on_cpu or _TPU.value):
      rows.append(dict(impl=impl, note="n/a on CPU" if on_cpu else "n/a on TPU"))
      continue
    attend = attention_fn(impl)
    fwd = lambda q, k, v, lg, attend=attend: attend(q, k, v, lg)
    fb = forward_backward(attend)
    if impl == "pallas" and _TPU.value:
      # The TPU kernels, not the interpreter: compiled for the chip, whatever runs the timing.
      fwd = lambda q, k, v, lg: cap.masked_cross_attention_pallas(q, k, v, lg, backend="tpu",
                                                                  interpret=False)
      fb = forward_backward(fwd)
    try:
      row = dict(impl=impl)
      if impl == "pallas" and on_cpu and not _INTERPRET.value:
        row.update(fwd_ms=None, fb_ms=None)
      else:
        (row["fwd_ms"], row["fwd_mib"]), (row["fb_ms"], row["fb_mib"]) = (
            measure(fwd, (q, k, v, logits), _ITERS.value),
            measure(fb, (q, k, v, logits, do), _ITERS.value))
      if _TPU.value:
        row.update(fwd_mib=tpu_mib(fwd, (q, k, v, logits), _TPU.value),
                   fb_mib=tpu_mib(fb, (q, k, v, logits, do), _TPU.value))
      elif row["fwd_ms"] is None:
        row = dict(impl=impl, note="skipped on CPU (interpreter; --interpret or --tpu)")
    except Exception as e:  # cuDNN refuses some shapes/dtypes; report and go on
      row = dict(impl=impl, note=f"failed: {type(e).__name__}: {str(e)[:60]}")
    rows.append(row)
  return rows, skipped_tiles(logits, num_q, head_dim, h, dtype)


def ratio(rows, metric, other):
  by_impl = {r["impl"]: r for r in rows}
  a, b = by_impl["pallas"].get(metric), by_impl[other].get(metric)
  return f"{a / b:.2f}" if a is not None and b is not None else "-"


def print_table(results):
  head = (f"{'Q':>4} {'K':>6} {'D':>4} {'skip':>5}  {'impl':<7}{'fwd ms':>9}{'f+b ms':>9}"
          f"{'fwd MiB':>9}{'f+b MiB':>9}   kernel/xla: fwd f+b mem   kernel/dpa: fwd f+b mem")
  print(head)
  print("-" * len(head))
  for (num_q, num_k, head_dim), (rows, skip) in results.items():
    for r in rows:
      key = f"{num_q:>4} {num_k:>6} {head_dim:>4} {100 * skip:>4.0f}%  {r['impl']:<7}"
      if "note" in r:
        print(f"{key}{r['note']}")
        continue
      ms = [f"{r[m]:>9.3f}" if r[m] is not None else f"{'-':>9}" for m in ("fwd_ms", "fb_ms")]
      line = f"{key}{''.join(ms)}{r['fwd_mib']:>9.1f}{r['fb_mib']:>9.1f}"
      if r["impl"] == "pallas":
        line += "   " + " ".join(f"{ratio(rows, m, 'xla'):>5}" for m in
                                 ("fwd_ms", "fb_ms", "fb_mib"))
        line += "       " + " ".join(f"{ratio(rows, m, 'dpa'):>5}" for m in
                                     ("fwd_ms", "fb_ms", "fb_mib"))
      print(line)


def main(argv: Sequence[str]) -> None:
  del argv
  queries, keys, head_dims = ([int(x) for x in f.value] for f in (_QUERIES, _KEYS, _HEAD_DIMS))
  if _QUICK.value:
    queries, keys, head_dims = [1, 32], [1024, 4096], [64]
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"batch {_BATCH.value}, heads {_HEADS.value}, {_DTYPE.value}, "
        f"empty masks {_EMPTY.value:.0%}, median of {_ITERS.value}")
  rng = np.random.default_rng(0)
  results = {}
  for head_dim in head_dims:
    for num_k in keys:
      for num_q in queries:
        results[num_q, num_k, head_dim] = run_config(num_q, num_k, head_dim, rng)
  print_table(results)
  where = f"compiled for TPU {_TPU.value} (deviceless)" if _TPU.value else "compiled here"
  print("skip: key tiles the kernel skips; ratios < 1: the kernel is faster / smaller. "
        f"MiB: XLA temp + output of the step {where}.")


if __name__ == "__main__":
  app.run(main)
