"""The TPU kernels compiled for real TPU chips without one: deviceless AOT compilation.

libtpu (the `jax[tpu]` extra) compiles for a named topology on any host:
`get_topology_desc(platform="tpu", ...)` gives abstract devices, and `jit(...).trace(...)
.lower().compile()` runs XLA:TPU and Mosaic, which check what the interpreter cannot: block
shapes, layouts and the VMEM each kernel needs. Nothing executes. Tracing under `jax.set_mesh`
names the chip to the kernels, so the blocks are those chosen for its VMEM.

Shapes: the mask decoder's cross-attention in both configs (derived from them), and the edges:
one query against 16384 and 20000 keys, head_dim 32 to 256, float32 and bfloat16. Each is compiled
for v5p and v6e, forward + backward (which compiles the forward kernel too); forward alone once
per generation. Where K is large, the compiled temp memory must stay within the size of K plus V
(no copy or relayout of K or V around the kernels).
"""

import functools
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unires_jax.config_lib import load_config
from unires_jax.kernels import cross_attention_pallas as cap

pytest.importorskip("libtpu", reason="deviceless TPU compilation needs libtpu (the jax[tpu] extra)")
from jax.experimental import topologies  # pylint: disable=g-import-not-at-top,wrong-import-position

TOPOLOGIES = {"v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
BATCH = 2  # examples per chip
CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs")


def decoder_shapes(config_name: str) -> list[tuple[int, int, int, int]]:
  """(heads, queries, keys, head_dim) of the mask decoder's cross-attention, one per FPN level.

  Queries: one [SEG] state per example (`unires.py`), plus the object and part slots with
  `use_region_queries`. Keys: the pixels of each level the decoder attends to, level l at stride
  4 * 2**l of the ConvNeXt input.
  """
  m = load_config(os.path.join(CONFIGS, f"{config_name}.py")).model
  dec = m.mask_decoder
  num_q = 1 + (m.max_objects + m.max_parts if dec.use_region_queries else 0)
  sides = sorted({m.convnext.image_size // (4 * 2**level) for level in dec.feature_levels})
  return [(dec.num_heads, num_q, side * side, dec.hidden_dim // dec.num_heads) for side in sides]


# (heads, queries, keys, head_dim, dtype, bound): bound = check temp <= size of K + V (at small
# K the fixed per-call buffers, e.g. the lane-replicated logsumexp, outweigh K and V).
CASES = (
    [(*s, "float32", False) for s in decoder_shapes("tiny")]
    + [(*s, dtype, s[2] >= 9216) for s in decoder_shapes("unires_pp_7b")
       for dtype in ("float32", "bfloat16")]
    + [
        (8, 1, 16384, 64, "float32", True),      # dk/dv failed with CompileTimeScopedVmemOom
        (8, 1, 16384, 128, "bfloat16", True),
        (4, 17, 20000, 64, "bfloat16", True),    # ragged last key block
        (8, 17, 1024, 32, "float32", False),     # dk/dv needed 20.7M of 16M VMEM on v5p
        (8, 100, 9216, 256, "bfloat16", True),
        (8, 1, 20000, 256, "float32", True),
    ])

# Forward alone (inference), one shape per generation; every case above is forward + backward.
FORWARD_ONLY = {"v5p": (8, 1, 16384, 64, "float32", True),
                "v6e": (8, 100, 9216, 256, "bfloat16", True)}


def _param(generation, case, backward):
  h, q, k, d, dtype, _ = case
  name = f"{generation}-{'fwd+bwd' if backward else 'fwd'}-h{h}-q{q}-k{k}-d{d}-{dtype}"
  return pytest.param(generation, *case, backward, id=name)


COMPILES = ([_param(g, case, False) for g, case in FORWARD_ONLY.items()]
            + [_param(g, case, True) for g in sorted(TOPOLOGIES) for case in CASES])


@functools.cache
def _mesh(generation: str) -> Mesh:
  topology = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[generation])
  return Mesh(topology.devices[:1], ("x",))


def _attention(q, k, v, logits):
  return cap.masked_cross_attention_pallas(q, k, v, logits, backend="tpu", interpret=False)


def _forward_backward(q, k, v, logits, do):
  _, vjp = jax.vjp(lambda q, k, v: _attention(q, k, v, logits), q, k, v)
  return vjp(do)


def _compile(fn, generation, shapes):
  """Compiled fn for one chip of the generation; shapes: (shape, dtype) of each argument."""
  mesh = _mesh(generation)
  replicated = NamedSharding(mesh, P())
  args = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]
  with jax.set_mesh(mesh):
    return jax.jit(fn).trace(*args).lower().compile()


@pytest.mark.parametrize("generation,heads,num_q,num_k,head_dim,dtype,bound,backward", COMPILES)
def test_kernels_compile_for_tpu(generation, heads, num_q, num_k, head_dim, dtype, bound,
                                 backward):
  qs, ks = (BATCH, heads, num_q, head_dim), (BATCH, heads, num_k, head_dim)
  shapes = [(qs, dtype), (ks, dtype), (ks, dtype), ((BATCH, num_q, num_k), jnp.float32)]
  if backward:
    shapes.append((qs, dtype))
  compiled = _compile(_forward_backward if backward else _attention, generation, shapes)
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 1 + 2 * backward
  if bound:
    kv_bytes = 2 * BATCH * heads * num_k * head_dim * jnp.dtype(dtype).itemsize
    assert compiled.memory_analysis().temp_size_in_bytes <= kv_bytes
