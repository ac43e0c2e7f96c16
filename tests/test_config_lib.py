"""Configs by path or name from any directory, `get_config(arg)` variants, config.json."""

import os

import pytest

from unires_jax import config_lib
from unires_jax.train import aot


def test_names_resolve_to_the_installed_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  installed = os.path.join(config_lib.installed_configs_dir(), "tiny.py")
  assert config_lib.resolve("configs/tiny.py") == installed
  assert config_lib.resolve("tiny.py") == config_lib.resolve("tiny") == installed
  assert config_lib.installed_configs() == ["demo", "demo_finetune", "tiny", "unires_pp_7b"]


def test_a_path_from_the_working_directory_wins(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.py").write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  return ml_collections.ConfigDict({'arg': arg})\n")
  assert config_lib.resolve("configs/tiny.py") == "configs/tiny.py"
  assert config_lib.load_config("configs/tiny.py:x=1").arg == "x=1"


def test_unknown_config_is_refused_with_the_known_names(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError,
                     match=r"'configs/big.py' not found .*\['demo', 'demo_finetune', 'tiny'"):
    config_lib.resolve("configs/big.py")
  with pytest.raises(ValueError, match="not found"):
    config_lib.resolve("elsewhere/tiny.py")  # only configs/NAME.py names an installed one


def test_parse_arg_types_and_errors():
  arg = config_lib.parse_arg("layers=4,rate=0.5,name=x,fast", layers=32, rate=1.0, name="",
                             fast=False)
  assert (arg.layers, arg.rate, arg.name, arg.fast) == (4, 0.5, "x", True)
  assert config_lib.parse_arg(None, layers=32).layers == 32
  assert config_lib.parse_arg("fast=false", fast=True).fast is False
  with pytest.raises(ValueError, match=r"unknown config argument 'layer' .* \['layers'\]"):
    config_lib.parse_arg("layer=4", layers=32)
  with pytest.raises(ValueError, match="layers='four' is not int"):
    config_lib.parse_arg("layers=four", layers=32)
  with pytest.raises(ValueError, match=r"'layers' needs a value"):
    config_lib.parse_arg("layers", layers=32)
  with pytest.raises(ValueError, match="takes no argument"):
    config_lib.load_config("configs/tiny.py:llm_layers=4")


def test_7b_variant_cuts_the_llm_only():
  full, small = (config_lib.load_config(s) for s in ("unires_pp_7b", "unires_pp_7b:llm_layers=4"))
  assert (full.model.llm.num_layers, small.model.llm.num_layers) == (32, 4)
  small.model.llm.num_layers = 32
  assert small.to_dict() == full.to_dict()


def test_7b_slice_recipes_resolve_and_fit_their_slices():
  """Each named slice's recipe (configs/unires_pp_7b.py SLICES, docs/tpu.md's table) sets the
  batch, remat and topology; the batch splits evenly over the slice's chips (fsdp over all)."""
  from configs import unires_pp_7b  # pylint: disable=g-import-not-at-top

  default = config_lib.load_config("configs/unires_pp_7b.py")
  assert default.topology == unires_pp_7b.SLICES[unires_pp_7b.DEFAULT_SLICE]["topology"]
  for name, recipe in unires_pp_7b.SLICES.items():
    config = config_lib.load_config(f"configs/unires_pp_7b.py:slice={name}")
    assert (config.topology, config.input.global_batch_size, config.model.remat) == (
        recipe["topology"], recipe["batch"], recipe["remat"]), name
    generation, dims = config.topology.split(":")
    chips = {t: n for n, t in aot.SLICES[generation]}[dims]  # a slice aot knows
    # gcloud's name counts TensorCores on v5p (2 per chip), chips on v6e.
    assert int(name.split("-")[1]) == chips * (2 if generation == "v5p" else 1), name
    assert config.input.global_batch_size % chips == 0 and config.mesh.fsdp == -1, name
    config.update(topology=default.topology)
    config.input.global_batch_size = default.input.global_batch_size
    config.model.remat = default.model.remat
    assert config.to_dict() == default.to_dict(), name  # nothing else differs
  with pytest.raises(ValueError, match=r"unknown slice 'v5p-64'; known: v5p-16, v5p-32"):
    config_lib.load_config("configs/unires_pp_7b.py:slice=v5p-64")


def test_config_json_round_trip(tmp_path):
  config = config_lib.load_config("demo")
  config_lib.write_config_json(config, str(tmp_path))
  assert config_lib.read_config_json(str(tmp_path)).to_dict() == config.to_dict()
  assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left


def test_the_finetune_config_takes_its_base_and_names_what_it_lacks(tmp_path):
  base = config_lib.load_config("demo")
  base.model.no_target_hidden = 48  # as a run with --config.model.no_target_hidden=48 saved it
  config_lib.write_config_json(base, str(tmp_path))
  config = config_lib.load_config(f"demo_finetune:base={tmp_path},lora_rank=8,steps=120")
  assert (config.train.init_from, config.input.data_dir, config.input.tokenizer) == (
      str(tmp_path), f"{tmp_path}/tfds", f"{tmp_path}/tokenizer")
  assert config.model.no_target_hidden == 48  # the base's model, not configs/demo.py's
  assert config.model.llm.lora.rank == 8 and len(config.model.llm.lora.targets) == 7
  assert (config.train.num_steps, config.optimizer.warmup_steps) == (120, 10)
  assert {e.name for e in config.input.train.values()} == {"ref_custom", "ref_coco_m"}
  assert config_lib.load_config(f"demo_finetune:base={tmp_path}").model.llm.lora.rank == 0
  with pytest.raises(ValueError, match=r"needs the base run's work directory"):
    config_lib.load_config("demo_finetune")
  with pytest.raises(ValueError, match=r"base=/nowhere holds no config.json"):
    config_lib.load_config("demo_finetune:base=/nowhere")
