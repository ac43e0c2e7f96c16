"""ConvNeXt, the high-resolution encoder E_h (timm's layout, as in `convnext_large`).

The CLIP ConvNeXt-L trunk is timm's `ConvNeXt` with a patch-4 stem, kernel-7 depthwise
convolutions, a channels-last MLP (`conv_mlp=False`), layer scale and no GRN. The parameter tree
mirrors timm's module names (`stem/0`, `stages/1/downsample/1`, `stages/2/blocks/5/mlp/fc1`, ...)
so that `unires_jax.convert.convnext` is a short table of rules.

Scanned blocks (`scan_layers=True`, `config.model.scan_layers`): each stage's blocks are one
stacked `ConvNeXtBlock` (`stages/2/blocks/mlp/fc1/kernel` is `[27, ...]`, leading logical axis
`layers`) applied with `jax.lax.scan`, so XLA compiles one block per stage instead of 36 (at
768 px the unrolled trunk alone takes minutes of XLA:TPU's compile). The parameters equal the
unrolled model's for the same rngs; the converters unstack them under the unrolled names.

The encoder returns the four stage outputs C2..C5, which is what timm's `features_only=True`
model returns: the head's norm is not applied.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unires_jax.models import layers

STEM_PATCH = 4
KERNEL_SIZE = 7
MLP_RATIO = 4
NUM_STAGES = 4


def drop_path_rates(drop_path_rate: float, depths: tuple[int, ...]) -> list[list[float]]:
  """Stochastic-depth rate of every block, per stage.

  As in timm: rates grow linearly from 0 at the first block to `drop_path_rate` at the last
  block of the network, counting blocks across all stages.
  """
  total = sum(depths)
  flat = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
  out, start = [], 0
  for depth in depths:
    out.append(flat[start:start + depth])
    start += depth
  return out


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2 on `[..., channels]`.

  The channels are named `embed` here (the tower's residual width, as in a transformer MLP), not
  `conv_out`, so that the two dimensions of a kernel map to different mesh axes.
  """

  def __init__(self, dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    hidden = MLP_RATIO * dim
    self.fc1 = layers.linear(
        dim, hidden, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = layers.linear(
        hidden, dim, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(layers.gelu_exact(self.fc1(x)))


class ConvNeXtBlock(nnx.Module):
  """Depthwise 7x7 conv, LayerNorm, MLP, layer scale, stochastic depth, residual.

  Stochastic depth drops the whole residual branch per sample: `nnx.Dropout` with its mask
  broadcast over height, width and channels is exactly timm's `DropPath`, and it brings the
  `deterministic` attribute that `model.train()` / `model.eval()` toggle and its own fork of
  the 'dropout' rng stream.

  `cfg` is `config.model.convnext` (`layer_scale_init`, `norm_eps`, and
  `grouped_conv_grad_bug_workaround`, which runs the depthwise convolution per device on its own
  rows: see `ConvNeXt`).
  """

  def __init__(self, dim: int, *, drop_path: float, cfg: ml_collections.ConfigDict, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    pad = KERNEL_SIZE // 2
    self.conv_dw = layers.conv(
        dim, dim, KERNEL_SIZE, padding=((pad, pad), (pad, pad)), feature_group_count=dim,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = layers.layer_norm(
        dim, "conv_out", epsilon=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = Mlp(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gamma = layers.param(
        rngs, nnx.initializers.constant(cfg.layer_scale_init), (dim,), ("conv_out",), param_dtype)
    # timm uses an identity for rate 0 (the first block always); so do we, without an rng.
    self.drop_path = (
        nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs) if drop_path > 0 else None)
    self.dtype = dtype
    self.conv_per_device = bool(cfg.grouped_conv_grad_bug_workaround)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, height, width, dim]` -> same shape."""
    if self.conv_per_device:
      graphdef, conv_params = nnx.split(self.conv_dw)
      y = layers.batch_local(lambda x, p: nnx.merge(graphdef, p)(x), x, conv_params)
    else:
      y = self.conv_dw(x)
    y = self.mlp(self.norm(y))
    y = y * jnp.asarray(self.gamma[...], self.dtype or y.dtype)
    if self.drop_path is not None:
      y = self.drop_path(y)
    return x + y


def _scan_body(block: ConvNeXtBlock, x: jax.Array) -> tuple[jax.Array, None]:
  """One scanned block: `[batch, height, width, dim]` -> the same shape, as the carry."""
  return block(x), None


class ConvNeXtStage(nnx.Module):
  """Optional downsample (LayerNorm + conv 2x2/2), then one block per `drop_path` rate; `dd`
  holds the layers' dtype, param_dtype and rngs. `scan_blocks` stacks the blocks (see the
  module docstring); stochastic depth then has to be off (its rate differs per block)."""

  def __init__(self, in_dim: int, dim: int, *, downsample: bool, drop_path: list[float],
               cfg: ml_collections.ConfigDict, scan_blocks: bool = False, **dd):
    if scan_blocks and any(rate > 0 for rate in drop_path):
      raise ValueError(
          f"convnext config: drop_path_rate {cfg.drop_path_rate} > 0 needs unrolled blocks "
          "(config.model.scan_layers=False): stochastic depth differs per block")
    if downsample:
      self.downsample = nnx.List([
          layers.layer_norm(in_dim, "conv_out", epsilon=cfg.norm_eps, **dd),
          layers.conv(in_dim, dim, 2, strides=2, padding="VALID", **dd),
      ])
    else:
      self.downsample = None
    blocks = [ConvNeXtBlock(dim, drop_path=rate, cfg=cfg, **dd) for rate in drop_path]
    self.scan_blocks = scan_blocks
    self.blocks = layers.stack_modules(blocks) if scan_blocks else nnx.List(blocks)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, height, width, in_dim]` -> `[batch, height / 2, width / 2, dim]` (downsampling)
    or the same shape."""
    if self.downsample is not None:
      for layer in self.downsample:
        x = layer(x)
    if self.scan_blocks:
      x, _ = layers.scan_layers(_scan_body, self.blocks, x)
      return x
    for block in self.blocks:
      x = block(x)
    return x


class ConvNeXt(nnx.Module):
  """The ConvNeXt trunk: images `[batch, height, width, in_chans]` -> [C2, C3, C4, C5].

  Stage i's output is `[batch, height / s_i, width / s_i, dims[i]]` with s = (4, 8, 16, 32).
  Height and width must be multiples of 32. Built in training mode (drop path active when
  `drop_path_rate > 0`), as `nnx.Dropout` is; call `model.eval()` for inference.

  Config fields (`config.model.convnext`): image_size, in_chans, depths, dims,
  layer_scale_init, drop_path_rate, norm_eps, grouped_conv_grad_bug_workaround.
  `scan_layers` stacks each stage's blocks and scans over them (see the module docstring).

  `grouped_conv_grad_bug_workaround`: jaxlib 0.10.2's SPMD partitioner gets the kernel gradient
  of a grouped (e.g. depthwise) convolution wrong when the batch is not split over every mesh
  axis: it comes out multiplied by the number of devices that hold the same rows (2x on a
  data=2, fsdp=2, tensor=2 mesh; `tests/models/test_convnext.py` reproduces it on a bare
  convolution and fails once jaxlib is fixed). With the switch on, the depthwise convolutions
  run per device on their own rows (`layers.batch_local`), whose gradient is right; the
  outputs are the same either way.
  """

  def __init__(
      self,
      cfg: ml_collections.ConfigDict,
      *,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      scan_layers: bool = False,
      rngs: nnx.Rngs,
  ):
    depths, dims = tuple(cfg.depths), tuple(cfg.dims)
    if len(depths) != NUM_STAGES or len(dims) != NUM_STAGES:
      raise ValueError(
          f"convnext config: depths {depths} and dims {dims} must each have {NUM_STAGES} entries")
    if cfg.image_size % self.strides[-1]:
      raise ValueError(
          f"convnext config: image_size {cfg.image_size} is not a multiple of {self.strides[-1]}")
    self.in_chans = cfg.in_chans
    self.depths = depths
    self._dims = dims
    dd = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem = nnx.List([
        layers.conv(cfg.in_chans, dims[0], STEM_PATCH, strides=STEM_PATCH, padding="VALID", **dd),
        layers.layer_norm(dims[0], "conv_out", epsilon=cfg.norm_eps, **dd),
    ])
    rates = drop_path_rates(cfg.drop_path_rate, depths)
    self.stages = nnx.List([
        ConvNeXtStage(
            dims[max(i - 1, 0)], dims[i], downsample=i > 0, drop_path=rates[i], cfg=cfg,
            scan_blocks=scan_layers, **dd)
        for i in range(NUM_STAGES)
    ])

  @property
  def strides(self) -> tuple[int, ...]:
    """Stride of each stage output relative to the input: (4, 8, 16, 32)."""
    return tuple(STEM_PATCH * 2**i for i in range(NUM_STAGES))

  @property
  def dims(self) -> tuple[int, ...]:
    """Channels of each stage output."""
    return self._dims

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """`[batch, height, width, in_chans]` -> 4 x `[batch, height / s, width / s, dims[i]]`."""
    if x.ndim != 4 or x.shape[-1] != self.in_chans:
      raise ValueError(
          f"ConvNeXt input must be [batch, height, width, {self.in_chans}], got shape {x.shape}")
    if x.shape[1] % self.strides[-1] or x.shape[2] % self.strides[-1]:
      raise ValueError(
          f"ConvNeXt input height and width must be multiples of {self.strides[-1]}, "
          f"got shape {x.shape}")
    for layer in self.stem:
      x = layer(x)
    features = []
    for stage in self.stages:
      x = stage(x)
      features.append(x)
    return features
