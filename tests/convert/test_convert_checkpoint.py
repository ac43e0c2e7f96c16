"""A training checkpoint sharded over 8 devices to PyTorch, streaming, and back (issue 6)."""

import os
import tracemalloc

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from unires_jax import checkpoint, config_lib, utils
from unires_jax.convert import clip_vit, convnext, llama, torch_io
from unires_jax.convert import unires as convert_unires
from unires_jax.train import checkpointer
from tests import tiny_step

# One worker runs the whole module (--dist loadgroup), so its module fixture `sharded_run` (a
# trained, saved run) is set up once; with the tests spread over both workers each worker set it
# up. It trains with the shared tiny step (tests/tiny_step.py): the group is that step's.
pytestmark = pytest.mark.xdist_group(tiny_step.GROUP)

GROUP_BYTES = 128 << 10  # the tiny model is 1.4 MiB


def _flat(params) -> dict[str, np.ndarray]:
  return {utils.path_str(p): v.get_value() for p, v in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))}


@pytest.fixture(scope="module")
def sharded_run(tiny_steps, tmp_path_factory):
  """A work directory whose step-2 checkpoint was trained and saved on a data=2, fsdp=2,
  tensor=2 mesh of the 8 emulated devices; and its parameters, gathered by the test."""
  workdir = str(tmp_path_factory.mktemp("run"))
  # Everything trains, backbones included: the shared tiny step (tests/tiny_step.py), compiled
  # once for this and the sharded-step and checkpoint tests.
  config = tiny_steps.config
  train_step = tiny_steps.step("2x2x2")
  state = tiny_steps.initial_state("2x2x2")
  for seed in (0, 1):
    state, _ = train_step(state, tiny_steps.batch("2x2x2", seed))
  config_lib.write_config_json(config, workdir)
  saver = checkpointer.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=2, keep=1)
  saver.save(2, state, None)
  saver.close()
  flat = _flat(state.params)
  assert sum(len(a.sharding.device_set) > 1 and not a.sharding.is_fully_replicated
             for a in flat.values()) > 10  # really sharded
  return workdir, config, {path: np.asarray(a) for path, a in flat.items()}


@pytest.mark.slow
def test_sharded_checkpoint_streams_to_pytorch_and_back(sharded_run, tmp_path, monkeypatch):
  workdir, config, params = sharded_run
  reads = []
  read_params = checkpoint.read_params

  def spy(where, paths):
    out = read_params(where, paths)
    reads.append([out[p] for p in paths])
    return out

  monkeypatch.setattr(checkpoint, "read_params", spy)
  out = tmp_path / "exported"
  tracemalloc.start()
  convert_unires.export_checkpoint(workdir, str(out), group_bytes=GROUP_BYTES)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()

  model_bytes = sum(a.nbytes for a in params.values())
  largest = max(a.nbytes for a in params.values())
  group_peak = max(sum(a.nbytes for a in group) for group in reads)
  print(f"\nconversion of {len(params)} tensors, {model_bytes / 2**20:.2f} MiB: "
        f"{len(reads)} reads, the largest {group_peak / 2**10:.1f} KiB (limit "
        f"{GROUP_BYTES / 2**10:.0f} KiB, largest tensor {largest / 2**10:.1f} KiB); peak host "
        f"memory allocated by Python / NumPy during the conversion {peak / 2**20:.2f} MiB "
        "(Orbax's own bookkeeping included)")
  # Tensor by tensor onto the host: no device array, never more than one group at a time.
  assert all(type(a) is np.ndarray for group in reads for a in group)  # pylint: disable=unidiomatic-typecheck
  assert sum(len(group) for group in reads) == len(params)
  assert group_peak <= max(GROUP_BYTES, largest) < model_bytes / 4

  # Every parameter is in the export, under its PyTorch name and layout, with the trained values.
  shapes = {path: a.shape for path, a in params.items()}

  def sub(prefix):
    return {p[len(prefix):]: s for p, s in shapes.items() if p.startswith(prefix)}

  for subdir, prefix, plan in (
      ("vision_tower", "vision/", clip_vit.export_plan(sub("vision/"))),
      ("high_res_encoder", "convnext/", convnext.export_plan(sub("convnext/"))),
      ("llm", "llm/", llama.export_plan(sub("llm/")))):
    tensors = safetensors.numpy.load_file(out / subdir / "model.safetensors")
    assert tensors.keys() == plan.keys(), subdir
    for name, (path, layout) in plan.items():
      np.testing.assert_array_equal(tensors[name], torch_io.to_torch(params[prefix + path], layout),
                                    err_msg=name)
  heads = safetensors.numpy.load_file(out / convert_unires.HEADS_FILE)
  for name, value in heads.items():
    np.testing.assert_array_equal(value, params[name], err_msg=name)

  # And back: the PyTorch directory imports to the same parameters, bit for bit.
  model = convert_unires.import_released(
      config, vision_dir=str(out / "vision_tower"), convnext_file=str(out / "high_res_encoder"),
      llm_dir=str(out / "llm"), heads_file=str(out / convert_unires.HEADS_FILE), seed=1)
  back = {path: np.asarray(var[...]) for path, var in torch_io.iter_params(model)}
  assert back.keys() == params.keys()
  for path, value in params.items():
    np.testing.assert_array_equal(back[path], value, err_msg=path)


@pytest.mark.slow
def test_bfloat16_export_and_a_step_that_is_not_there(sharded_run, tmp_path):
  workdir, _, params = sharded_run
  convert_unires.export_checkpoint(workdir, str(tmp_path / "bf16"), dtype="bfloat16")
  heads = safetensors.numpy.load_file(tmp_path / "bf16" / convert_unires.HEADS_FILE)
  assert heads.keys() == {p for p in params if p.split("/")[0] not in convert_unires.BACKBONES}
  for name, value in heads.items():
    assert value.dtype == np.dtype("bfloat16"), name
    np.testing.assert_array_equal(value, params[name].astype("bfloat16"), err_msg=name)
  with pytest.raises(FileNotFoundError,
                     match=r"no checkpoint of step 7 in .*checkpoints \(it has \[2\]\)"):
    convert_unires.export_checkpoint(workdir, str(tmp_path / "x"), step=7)
  assert not (tmp_path / "x").exists()
