"""Reading PyTorch weights from disk and writing them into NNX modules, and writing model
directories that PyTorch libraries load (`write_model_dir`).

Sources users have on disk:
  * a `transformers` model directory: `config.json` plus `model.safetensors`, a sharded
    `model.safetensors.index.json`, `pytorch_model.bin` or a sharded `pytorch_model.bin.index.json`;
  * a single state-dict file: `.safetensors`, or `.bin` / `.pt` / `.pth` (timm, open_clip).

Pickled files are read only with `torch.load(weights_only=True)`, which refuses arbitrary objects.
Tensors come back as NumPy arrays (bfloat16 through `ml_dtypes`); safetensors tensors are read one
at a time, when a converter takes them.
"""

import json
import os
from typing import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unires_jax import utils
from unires_jax.models import layers

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class CheckpointError(ValueError):
  """A weights file or directory that cannot be converted; the message names the file/key."""


class LazyTensor:
  """One tensor of a `.safetensors` file, read from disk when converted to an array
  (`np.asarray`): a converter holds one source tensor at a time, not the whole checkpoint."""

  def __init__(self, path: str, name: str, shape: tuple[int, ...]):
    self.path, self.name, self.shape = path, name, tuple(shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # the array is read fresh each time
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top

    try:
      with safe_open(self.path, framework="numpy") as f:
        value = f.get_tensor(self.name)
    except Exception as e:  # SafetensorError, OSError, ... for a damaged file
      raise CheckpointError(f"{self.path}: tensor {self.name!r} is unreadable ({e})") from e
    return value if dtype is None else value.astype(dtype)


def _read_safetensors(path: str) -> dict[str, LazyTensor]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  try:
    with safe_open(path, framework="numpy") as f:
      return {name: LazyTensor(path, name, f.get_slice(name).get_shape()) for name in f.keys()}
  except Exception as e:  # SafetensorError, OSError, ... for a corrupt or truncated file
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _read_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(
        f"{path}: reading PyTorch pickles needs the 'torch' extra (pip install unires-jax[torch])"
    ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for corrupt or unsafe files.
    raise CheckpointError(f"{path}: not a readable PyTorch weights file ({e})") from e
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = _torch_to_numpy(v)
  return out


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top

  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=g-import-not-at-top

    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def read_state_file(path: str) -> Mapping[str, np.ndarray]:
  """One state-dict file (`.safetensors`, `.bin`, `.pt`, `.pth`) -> {name: array}; safetensors
  tensors are `LazyTensor`s (read by `np.asarray`), pickles are read whole."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such weights file")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(PICKLE_SUFFIXES):
    return _read_pickle(path)
  raise CheckpointError(
      f"{path}: unknown weights format; expected .safetensors or one of {PICKLE_SUFFIXES}"
  )


def read_state_dir(directory: str) -> Mapping[str, np.ndarray]:
  """A `transformers` model directory (single or sharded weights) -> {name: array}."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such model directory")
  for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
    index_path = os.path.join(directory, index_name)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise CheckpointError(f"{index_path}: not a weights index ({e})") from e
      out: dict[str, np.ndarray] = {}
      for shard in sorted(set(weight_map.values())):
        out.update(read_state_file(os.path.join(directory, shard)))
      missing = sorted(set(weight_map) - set(out))
      if missing:
        raise CheckpointError(f"{index_path}: tensor {missing[0]!r} listed but not in its shard")
      return out
  for single in (SAFETENSORS_SINGLE, TORCH_SINGLE):
    path = os.path.join(directory, single)
    if os.path.isfile(path):
      return read_state_file(path)
  raise CheckpointError(
      f"{directory}: no weights found (looked for {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
      f"{TORCH_SINGLE}, {TORCH_INDEX})"
  )


def read_config_json(directory: str) -> dict:
  """`directory/config.json` as a dict, with a clear error when absent or malformed."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory}: missing config.json")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: malformed JSON ({e})") from e


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Keeps the entries under `prefix` (e.g. open_clip's 'visual.trunk.'), prefix removed."""
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class TorchState:
  """A state dict being consumed by a converter.

  `take(name)` returns a tensor and marks it used; a missing tensor raises a `CheckpointError`
  naming the key and the source. `unused()` lists what no rule consumed.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
    self._tensors = tensors
    self._used: set[str] = set()
    self.source = source

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def take(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise CheckpointError(f"{self.source}: missing tensor {name!r}")
    self._used.add(name)
    return np.asarray(self._tensors[name])

  def unused(self) -> list[str]:
    return sorted(set(self._tensors) - self._used)


def iter_params(module: nnx.Module) -> Iterator[tuple[str, nnx.Param]]:
  """(path 'a/b/0/kernel', variable) for every `nnx.Param` of `module`."""
  for path, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Param):
      yield utils.path_str(path), var


def unstacked_params(module: nnx.Module) -> dict[str, tuple[nnx.Param, int | None]]:
  """{unrolled path: (variable, layer index or None)} for every `nnx.Param` of `module`.

  A stacked-layer parameter (`config.model.scan_layers`), `[num_layers, *shape]` at
  'model/layers/mlp/up_proj/kernel', appears once per layer under its unrolled path
  ('model/layers/<i>/mlp/up_proj/kernel', index i); other parameters as `iter_params` gives
  them (index None). The converters' name rules are written against these paths, so they are
  the same with scanned and unrolled layers.
  """
  out = {}
  for path, var in iter_params(module):
    if layers.is_stacked(var):
      out.update({layers.layer_path(path, i): (var, i) for i in range(var.get_value().shape[0])})
    else:
      out[path] = (var, None)
  return out


def read_unstacked(var: nnx.Param, index: int | None) -> np.ndarray:
  """The value of an `unstacked_params` entry as a host array (one layer of a stack)."""
  return np.asarray(var[...] if index is None else var[index])


def assign_params(
    module: nnx.Module,
    values: Mapping[str, np.ndarray],
    source: str,
    consume: bool = False,
    select: type[nnx.Param] = nnx.Param,
) -> None:
  """Sets every `nnx.Param` of `module` from `values` ({'a/b/0/kernel': array}), keyed by the
  unrolled paths of `unstacked_params` (a stacked-layer parameter gets its layers' values
  stacked).

  Every parameter must be given exactly once with its exact shape; the error names the
  parameter, the source and the shapes. Values are cast to the parameter's dtype. `consume`
  removes each value from `values` (a dict) once it is set, so that memory holds each tensor
  once, as a source array or as a parameter, not both. `select`: set only the parameters of
  this type (e.g. `nnx.LoRAParam`, an adapter); the others are left as they are.
  """
  params = {path: (var, index) for path, (var, index) in unstacked_params(module).items()
            if isinstance(var, select)}
  missing = sorted(set(params) - set(values))
  if missing:
    raise CheckpointError(
        f"{source}: no value for parameter {missing[0]!r} ({len(missing)} in all)")
  extra = sorted(set(values) - set(params))
  if extra:
    raise CheckpointError(f"{source}: converter produced unknown parameter {extra[0]!r}")
  stacks: dict[int, list[np.ndarray]] = {}
  for name, (var, index) in params.items():
    value = np.asarray(values.pop(name) if consume else values[name])
    current = var.get_value()
    shape = current.shape if index is None else current.shape[1:]
    if value.shape != shape:
      raise CheckpointError(
          f"{source}: parameter {name!r} has shape {shape} in the model but "
          f"{value.shape} in the checkpoint (check the config against the weights)"
      )
    if index is None:
      var.set_value(jnp.asarray(value, dtype=current.dtype))
      continue
    layers_of = stacks.setdefault(id(var), [])
    layers_of.append(value.astype(current.dtype))
    if len(layers_of) == current.shape[0]:  # unstacked_params lists a stack's layers in order
      var.set_value(jnp.asarray(np.stack(stacks.pop(id(var)))))


def convert_linear(state: TorchState, torch_name: str, bias: bool = True) -> dict[str, np.ndarray]:
  """torch `nn.Linear` (weight [out, in]) -> {'kernel': [in, out], 'bias': [out]}."""
  out = {"kernel": state.take(f"{torch_name}.weight").T}
  if bias:
    out["bias"] = state.take(f"{torch_name}.bias")
  return out


def convert_norm(
    state: TorchState, torch_name: str, bias: bool = True, scale_key: str = "weight"
) -> dict[str, np.ndarray]:
  """torch LayerNorm / RMSNorm -> {'scale', 'bias'}."""
  out = {"scale": state.take(f"{torch_name}.{scale_key}")}
  if bias:
    out["bias"] = state.take(f"{torch_name}.bias")
  return out


def convert_conv(state: TorchState, torch_name: str, bias: bool = True) -> dict[str, np.ndarray]:
  """torch `nn.Conv2d` (weight [out, in/g, kh, kw]) -> {'kernel': [kh, kw, in/g, out], 'bias'}."""
  out = {"kernel": state.take(f"{torch_name}.weight").transpose(2, 3, 1, 0)}
  if bias:
    out["bias"] = state.take(f"{torch_name}.bias")
  return out


def flatten_prefixed(prefix: str, tree: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{'kernel': x} under prefix 'a/b' -> {'a/b/kernel': x}."""
  return {f"{prefix}/{k}": v for k, v in tree.items()}


def convert_all(
    rules: Callable[[TorchState], dict[str, np.ndarray]],
    tensors: Mapping[str, np.ndarray],
    module: nnx.Module,
    source: str,
    allow_unused: Callable[[str], bool] = lambda name: False,
) -> None:
  """Applies a converter's `rules` to `tensors` and writes the result into `module`.

  Tensors that no rule consumed are an error unless `allow_unused(name)` says they are
  expected (e.g. a classification head that the feature extractor does not have).
  """
  state = TorchState(tensors, source)
  values = rules(state)
  leftover = [n for n in state.unused() if not allow_unused(n)]
  if leftover:
    raise CheckpointError(
        f"{source}: tensor {leftover[0]!r} was not used ({len(leftover)} unused in all); "
        "the checkpoint does not match this architecture"
    )
  assign_params(module, values, source, consume=True)


def write_model_dir(out_dir: str, config: Mapping, tensors: Mapping[str, np.ndarray],
                    metadata: Mapping[str, str] | None = None) -> None:
  """Writes `config.json` and `model.safetensors` (with `metadata` besides `format: pt`) into a
  new directory `out_dir` (`utils.new_directory`)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  with utils.new_directory(out_dir) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(tmp, SAFETENSORS_SINGLE), metadata={**(metadata or {}), "format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(dict(config), f, indent=2, sort_keys=True)


# How a Flax parameter becomes a PyTorch tensor (`to_torch`).
SAME = "same"
LINEAR = "linear"  # Dense kernel [in, out] -> nn.Linear weight [out, in]
CONV = "conv"      # Conv kernel [kh, kw, in/g, out] -> nn.Conv2d weight [out, in/g, kh, kw]

# An export plan: PyTorch name -> (Flax path within the exported module, layout), in file order.
ExportPlan = dict[str, tuple[str, str]]


def to_torch(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == LINEAR:
    return value.T
  if layout == CONV:
    return value.transpose(3, 2, 0, 1)
  if layout != SAME:
    raise ValueError(f"unknown layout {layout!r}")
  return value


def torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  """The shape `to_torch` gives an array of `shape`."""
  if layout == LINEAR:
    return tuple(reversed(shape))
  if layout == CONV:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def module_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """{unrolled path: shape} of every `nnx.Param` of `module`, a stacked-layer parameter once per
  layer (`unstacked_params`): what an export plan is made from."""
  return {path: tuple(var.get_value().shape[0 if index is None else 1:])
          for path, (var, index) in unstacked_params(module).items()}


def export_tensors(plan: ExportPlan, module: nnx.Module) -> dict[str, np.ndarray]:
  """`module`'s parameters under their PyTorch names, in memory."""
  params = unstacked_params(module)
  return {name: to_torch(read_unstacked(*params[path]), layout)
          for name, (path, layout) in plan.items()}


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                       "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                       "uint8": "U8", "bool": "BOOL"}


class SafetensorsWriter:
  """Writes a `.safetensors` file one tensor at a time: the header first (from the known shapes
  and dtypes), then each tensor's bytes in header order, so memory holds one tensor at a time.

    with SafetensorsWriter(path, {"a": ((2, 3), np.float32), ...}, metadata) as w:
      w.write("a", array)  # in the order of the dict

  The file is the one `safetensors.save_file` would write for the same tensors in that order;
  `close` raises if a tensor was not written.
  """

  def __init__(self, path: str, layout: Mapping[str, tuple[tuple[int, ...], np.dtype]],
               metadata: Mapping[str, str] | None = None):
    self.path = path
    self._pending = list(layout)
    self._layout = {name: (tuple(shape), np.dtype(dtype))
                    for name, (shape, dtype) in layout.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in self._layout.items():
      if dtype.name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors lacks")
      size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                      "data_offsets": [offset, offset + size]}
      offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    self._file = open(path, "wb")  # pylint: disable=consider-using-with
    self._file.write(len(text).to_bytes(8, "little") + text)

  def write(self, name: str, value: np.ndarray) -> None:
    if not self._pending or self._pending[0] != name:
      raise ValueError(f"{self.path}: wrote {name!r}, expected "
                       f"{self._pending[0] if self._pending else 'no more tensors'!r}")
    shape, dtype = self._layout[name]
    if tuple(value.shape) != shape or value.dtype != dtype:
      raise ValueError(f"{self.path}: tensor {name!r} is {value.dtype}{list(value.shape)}, "
                       f"the header says {dtype}{list(shape)}")
    self._file.write(np.ascontiguousarray(value).tobytes())  # native order: little-endian hosts
    self._pending.pop(0)

  def close(self) -> None:
    self._file.close()
    if self._pending:
      raise ValueError(f"{self.path}: {len(self._pending)} tensors not written, the first "
                       f"{self._pending[0]!r}")

  def __enter__(self) -> "SafetensorsWriter":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.close()
    else:
      self._file.close()
