"""A LoRA-trained UniRES++ out to PyTorch (merged llm/ and PEFT's llm_adapter/) and back
(convert/lora.py, `unires-convert to-pytorch --lora_adapter`, `import_released(llm_adapter=)`)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from tests.repo import ROOT as REPO
from unires_jax import checkpoint, models
from unires_jax.config_lib import load_config
from unires_jax.convert import llama, torch_io
from unires_jax.convert import lora as lora_convert
from unires_jax.convert import unires as convert_unires

ATOL = 1e-4  # float32, as the other parity tests
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A PyTorch user with transformers and peft, and nothing of ours: the merged LLM, and the base
# with the PEFT adapter on top.
PEFT_USER = r"""
import json, sys
import numpy as np, peft, torch, transformers

export, base, ids, outputs = sys.argv[1:]
ids = torch.from_numpy(np.load(ids))
merged = transformers.LlamaForCausalLM.from_pretrained(f"{export}/llm").eval()
model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
with torch.no_grad():
  base_logits = model(ids).logits.numpy()
adapted = peft.PeftModel.from_pretrained(model, f"{export}/llm_adapter").eval()
with torch.no_grad():
  np.savez(outputs, merged=merged(ids).logits.numpy(), peft=adapted(ids).logits.numpy(),
           base=base_logits)
print(json.dumps({
    "modules": sorted({m.split(".")[0] for m in sys.modules} & {"jax", "jaxlib", "flax", "unires_jax"}),
    "base_model": adapted.peft_config["default"].base_model_name_or_path,
}))
"""


def _lora_config(**lora):
  config = load_config("configs/tiny.py")
  config.model.llm.lora.update({**dict(rank=4, alpha=8.0, dropout=0.1, targets=ALL), **lora})
  return config


def _params(model) -> dict[str, np.ndarray]:
  return {path: np.asarray(var[...]) for path, var in torch_io.iter_params(model)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny LoRA model whose adapters and added rows have moved (as training moves them),
  saved as a converted checkpoint, and its base LLM as a transformers directory."""
  config = _lora_config()
  model = models.build_model(config, nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam):
      var.set_value(var[...] + jnp.asarray(rng.normal(0, 0.1, var[...].shape), jnp.float32))
  root = tmp_path_factory.mktemp("lora")
  checkpoint.save_converted(nnx.state(model, nnx.Param), config, str(root / "ckpt"))
  llama.save_llama(model.llm, str(root / "base"))  # a LoRA module writes its base weights
  return config, model, root


@pytest.mark.slow
def test_merged_and_peft_logits_equal_ours_in_a_process_without_jax(trained, tmp_path):
  config, model, root = trained
  run = subprocess.run(
      [sys.executable, "-m", "unires_jax.cli.convert", "to-pytorch", f"--checkpoint={root / 'ckpt'}",
       f"--out={tmp_path / 'pt'}", "--lora_adapter", "--base_model=tiny-vicuna"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr
  assert "llm_adapter: 30 tensors" in run.stdout  # 7 targets x 2 layers x (A, B) + 2 row tables
  exported = json.loads((tmp_path / "pt" / "config.json").read_text())
  assert exported["llm"]["lora"]["rank"] == 0  # llm/ is the merged, plain model

  ids = np.random.default_rng(0).integers(0, 128, (2, 9))
  ids[0, 3], ids[1, -1] = 128, 137  # added rows, whose trained values the adapter carries
  np.save(tmp_path / "ids.npy", ids)
  run = subprocess.run(
      [sys.executable, "-c", PEFT_USER, str(tmp_path / "pt"), str(root / "base"),
       str(tmp_path / "ids.npy"), str(tmp_path / "out.npz")],
      cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr
  report = json.loads(run.stdout.strip().splitlines()[-1])
  assert report == {"modules": [], "base_model": "tiny-vicuna"}
  theirs = np.load(tmp_path / "out.npz")
  ours = np.asarray(model.llm(jnp.asarray(ids))[0])
  assert np.abs(ours - theirs["base"]).max() > 1e-2  # the adapters act
  np.testing.assert_allclose(theirs["merged"], ours, atol=ATOL, rtol=0)
  np.testing.assert_allclose(theirs["peft"], ours, atol=ATOL, rtol=0)

  # And back: the export's parts plus the base LLM plus the adapter are the model we started
  # from (`from-pytorch --llm_adapter`, the config's LoRA as the run's).
  lora = dict(config.model.llm.lora)
  (tmp_path / "lora_tiny.py").write_text(
      "from unires_jax.config_lib import load_config\n"
      "def get_config(arg=None):\n"
      f"  config = load_config({os.path.join(REPO, 'configs', 'tiny.py')!r})\n"
      f"  config.model.llm.lora.update({lora!r})\n"
      "  return config\n")
  pt = tmp_path / "pt"
  run = subprocess.run(
      [sys.executable, "-m", "unires_jax.cli.convert", "from-pytorch",
       f"--config={tmp_path / 'lora_tiny.py'}", f"--vision={pt / 'vision_tower'}",
       f"--convnext={pt / 'high_res_encoder'}", f"--llm={root / 'base'}",
       f"--heads={pt / convert_unires.HEADS_FILE}", f"--llm_adapter={pt / 'llm_adapter'}",
       f"--out={tmp_path / 'back'}"], cwd=REPO, capture_output=True, text=True, timeout=600,
      check=False)
  assert run.returncode == 0, run.stderr
  ours = _params(model)
  back = checkpoint.read_params(checkpoint.locate(str(tmp_path / "back")), sorted(ours))
  for path, value in ours.items():
    np.testing.assert_array_equal(back[path], value, err_msg=path)


def test_adapter_imports_back_bit_identically(trained, tmp_path):
  config, model, root = trained
  out = tmp_path / "pt"
  convert_unires.export_pytorch(model, config.model, str(out), lora_adapter=True)
  adapter = json.loads((out / lora_convert.ADAPTER_DIR / lora_convert.CONFIG_FILE).read_text())
  assert adapter["trainable_token_indices"] == {"embed_tokens": list(range(128, 138)),
                                                "lm_head": list(range(128, 138))}
  assert (adapter["r"], adapter["lora_alpha"], adapter["target_modules"]) == (4, 8.0, sorted(ALL))

  # The released parts (here: this export's) plus the base LLM plus the adapter: the model.
  back = models.build_model(config, nnx.Rngs(1))  # other values everywhere
  llama.load_llama(back.llm, str(root / "base"))
  lora_convert.load_adapter(back.llm, str(out / lora_convert.ADAPTER_DIR))
  ours, theirs = _params(model.llm), _params(back.llm)
  assert ours.keys() == theirs.keys()
  for path, value in ours.items():
    np.testing.assert_array_equal(theirs[path], value, err_msg=path)

  # Without the adapter the LoRA model starts as its base: B = 0, the added rows the table's.
  fresh = convert_unires.import_released(
      config, vision_dir=str(out / "vision_tower"), convnext_file=str(out / "high_res_encoder"),
      llm_dir=str(root / "base"), heads_file=str(out / convert_unires.HEADS_FILE), seed=1)
  assert not np.any(fresh.llm.model.layers[0].self_attn.q_proj.lora_b[...])
  np.testing.assert_array_equal(fresh.llm.new_token_embedding[...],
                                model.llm.model.embed_tokens.embedding[...][128:])


def test_adapter_errors_name_the_field(trained, tmp_path):
  config, model, _ = trained
  out = tmp_path / "pt"
  convert_unires.export_pytorch(model, config.model, str(out), lora_adapter=True)
  adapter_dir = str(out / lora_convert.ADAPTER_DIR)
  other = models.build_model(_lora_config(rank=8), nnx.Rngs(0))
  with pytest.raises(torch_io.CheckpointError, match=r"r=4 but config.model.llm.lora.rank=8"):
    lora_convert.load_adapter(other.llm, adapter_dir)
  fewer = models.build_model(_lora_config(targets=("q_proj", "v_proj")), nnx.Rngs(0))
  with pytest.raises(torch_io.CheckpointError, match=r"target_modules=.* but config.model.llm"):
    lora_convert.load_adapter(fewer.llm, adapter_dir)

  plain_config = _lora_config(rank=0)
  plain = models.build_model(plain_config, nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"no LoRA adapter \(config.model.llm.lora.rank=0\)"):
    convert_unires.export_pytorch(plain, plain_config.model, str(tmp_path / "x"),
                                  lora_adapter=True)


def _files(directory) -> dict[str, np.ndarray]:
  """Every tensor of an export, by file and name."""
  return {f"{f.relative_to(directory)}:{k}": v for f in sorted(directory.rglob("*.safetensors"))
          for k, v in safetensors.numpy.load_file(f).items()}


def test_scanned_layers_export_the_same_files(trained, tmp_path):
  """The trained model with its layers stacked (`scan_layers`) writes the very tensors of the
  unrolled one, merged and adapter, from memory and from a checkpoint."""
  config, model, _ = trained
  scanned_config = config.copy_and_resolve_references()
  scanned_config.model.scan_layers = True
  scanned = models.build_model(scanned_config, nnx.Rngs(1))
  torch_io.assign_params(scanned, {p: torch_io.read_unstacked(*v) for p, v in
                                   torch_io.unstacked_params(model).items()}, "unrolled")
  assert scanned.llm.model.layers.self_attn.q_proj.lora_b[...].shape == (2, 4, 64)
  convert_unires.export_pytorch(model, config.model, str(tmp_path / "unrolled"),
                                lora_adapter=True)
  convert_unires.export_pytorch(scanned, scanned_config.model, str(tmp_path / "scanned"),
                                lora_adapter=True)
  checkpoint.save_converted(nnx.state(scanned, nnx.Param), scanned_config, str(tmp_path / "ckpt"))
  convert_unires.export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "from_ckpt"),
                                   lora_adapter=True, group_bytes=64 << 10)
  want = _files(tmp_path / "unrolled")
  assert "llm_adapter/adapter_model.safetensors:base_model.model.model.layers.1.mlp.up_proj." \
         "lora_B.weight" in want
  for name in ("scanned", "from_ckpt"):
    got = _files(tmp_path / name)
    assert got.keys() == want.keys(), name
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"{name} {key}")
