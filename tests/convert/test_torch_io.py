"""Reading weights from disk: formats, sharded indexes, and the errors users see."""

import collections
import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from unires_jax.convert import torch_io
from unires_jax.models import layers


class _NotATensor:
  """A pickled object that `torch.load(weights_only=True)` must refuse to build."""

  def __reduce__(self):
    return (print, ("this must never run",))


def _tensors():
  return {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.bias": np.ones(2, np.float32)}


def test_safetensors_and_bin_files_read_the_same(tmp_path):
  safetensors.numpy.save_file(_tensors(), str(tmp_path / "w.safetensors"))
  torch.save({k: torch.from_numpy(v) for k, v in _tensors().items()}, tmp_path / "w.bin")
  for name in ("w.safetensors", "w.bin"):
    got = torch_io.read_state_file(str(tmp_path / name))
    assert set(got) == set(_tensors())
    for k, v in _tensors().items():
      np.testing.assert_array_equal(got[k], v)


def test_bfloat16_tensors_keep_their_values(tmp_path):
  t = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
  torch.save({"x": t}, tmp_path / "w.pt")
  got = torch_io.read_state_file(str(tmp_path / "w.pt"))["x"]
  np.testing.assert_array_equal(got.astype(np.float32), [1.5, -2.25, 3.0])


def test_sharded_safetensors_directory(tmp_path):
  first, second = {"a.weight": _tensors()["a.weight"]}, {"a.bias": _tensors()["a.bias"]}
  safetensors.numpy.save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
  safetensors.numpy.save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"))
  index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                          "a.bias": "model-00002-of-00002.safetensors"}}
  (tmp_path / torch_io.SAFETENSORS_INDEX).write_text(json.dumps(index))
  got = torch_io.read_state_dir(str(tmp_path))
  np.testing.assert_array_equal(got["a.bias"], second["a.bias"])


def test_corrupt_safetensors_names_the_file(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(torch_io.CheckpointError, match="model.safetensors"):
    torch_io.read_state_dir(str(tmp_path))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
  path = tmp_path / "evil.bin"
  torch.save(collections.OrderedDict(x=_NotATensor()), path)
  with pytest.raises(torch_io.CheckpointError, match="evil.bin"):
    torch_io.read_state_file(str(path))


def test_empty_directory_lists_what_it_looked_for(tmp_path):
  with pytest.raises(torch_io.CheckpointError, match="no weights found"):
    torch_io.read_state_dir(str(tmp_path))


def test_assign_params_reports_missing_and_misshapen():
  module = layers.linear(3, 2, ("embed", "mlp"), rngs=nnx.Rngs(0))
  with pytest.raises(torch_io.CheckpointError, match="no value for parameter 'bias'"):
    torch_io.assign_params(module, {"kernel": np.zeros((3, 2))}, "src")
  with pytest.raises(torch_io.CheckpointError, match=r"'kernel' has shape \(3, 2\).*\(2, 3\)"):
    torch_io.assign_params(module, {"kernel": np.zeros((2, 3)), "bias": np.zeros(2)}, "src")


def test_convert_all_rejects_unused_tensors():
  module = layers.linear(3, 2, ("embed", "mlp"), rngs=nnx.Rngs(0))
  tensors = dict(_tensors(), extra=np.zeros(1, np.float32))
  rules = lambda state: torch_io.convert_linear(state, "a")
  with pytest.raises(torch_io.CheckpointError, match="'extra' was not used"):
    torch_io.convert_all(rules, tensors, module, "src")
  torch_io.convert_all(rules, tensors, module, "src", allow_unused=lambda n: n == "extra")
  np.testing.assert_array_equal(module.kernel.get_value(), _tensors()["a.weight"].T)


def test_streaming_writer_gives_a_file_safetensors_reads(tmp_path):
  tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(5, np.int32),
             "c": np.full((3, 1, 2), 1.5, ml_dtypes.bfloat16), "empty": np.zeros((0, 4), np.float32)}
  layout = {name: (value.shape, value.dtype) for name, value in tensors.items()}
  with torch_io.SafetensorsWriter(str(tmp_path / "w.safetensors"), layout, {"k": "v"}) as writer:
    for name, value in tensors.items():
      writer.write(name, value)
  with safetensors.safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
    assert f.metadata() == {"k": "v"}
    for name, value in tensors.items():
      got = f.get_tensor(name)
      assert tuple(got.shape) == value.shape, name
      np.testing.assert_array_equal(got.float().numpy(), value.astype(np.float32), err_msg=name)


def test_streaming_writer_refuses_order_shape_and_missing_tensors(tmp_path):
  layout = {"a": ((2,), np.float32), "b": ((3,), np.float32)}
  path = str(tmp_path / "w.safetensors")
  with pytest.raises(ValueError, match=r"wrote 'b', expected 'a'"):
    with torch_io.SafetensorsWriter(path, layout) as writer:
      writer.write("b", np.zeros(3, np.float32))
  with pytest.raises(ValueError, match=r"tensor 'a' is float32\[3\], the header says float32\[2\]"):
    with torch_io.SafetensorsWriter(path, layout) as writer:
      writer.write("a", np.zeros(3, np.float32))
  with pytest.raises(ValueError, match=r"1 tensors not written, the first 'b'"):
    with torch_io.SafetensorsWriter(path, layout) as writer:
      writer.write("a", np.zeros(2, np.float32))
