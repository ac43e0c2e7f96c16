"""`unires-convert` end to end (issue 6): a converted checkpoint to PyTorch and back through the
command line, the export loaded in a fresh process that imports only the PyTorch libraries, and
wrong inputs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from unires_jax import models
from unires_jax.config_lib import load_config
from unires_jax.convert import torch_io
from unires_jax.convert import unires as convert_unires
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.models import prompt
from unires_jax import checkpoint

# One worker runs the whole module (--dist loadgroup), so its module fixture `exported` (a
# conversion through the command line) is set up once; with its two tests spread over both
# workers each worker set it up (30 s and 20 s in a run of the suite).
pytestmark = pytest.mark.xdist_group("convert_cli")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ATOL = 1e-4
TEXT = "please segment the red cup in this image ."

# Runs in a fresh interpreter: the export as a PyTorch user loads it, with their libraries only.
PYTORCH_USER = r"""
import json, sys
import numpy as np, safetensors.torch, timm, torch, transformers

export, inputs, outputs, text = sys.argv[1:]
x = np.load(inputs)
vision = transformers.CLIPVisionModel.from_pretrained(f"{export}/vision_tower").eval()
llm = transformers.LlamaForCausalLM.from_pretrained(f"{export}/llm").eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(f"{export}/llm")
with open(f"{export}/high_res_encoder/config.json") as f:
  spec = json.load(f)
trunk = timm.create_model(spec["timm_model"], num_classes=0, **spec["model_args"]).eval()
missing = trunk.load_state_dict(safetensors.torch.load_file(
    f"{export}/high_res_encoder/model.safetensors"), strict=False).missing_keys
with torch.no_grad():
  hidden = vision(torch.from_numpy(x["pixels"]), output_hidden_states=True).hidden_states
  logits = llm(torch.from_numpy(x["ids"])).logits
  stages = trunk.forward_intermediates(torch.from_numpy(x["image_high"]), intermediates_only=True)
np.savez(outputs, logits=logits.numpy(), **{f"hidden{i}": h.numpy() for i, h in enumerate(hidden)},
         **{f"stage{i}": s.numpy() for i, s in enumerate(stages)})
special = ["<img>", "[SEG]"]
print(json.dumps({
    "modules": sorted({m.split(".")[0] for m in sys.modules} & {"jax", "jaxlib", "flax", "unires_jax"}),
    "missing": missing, "special_ids": tokenizer.convert_tokens_to_ids(special),
    "text_ids": tokenizer(text, add_special_tokens=False)["input_ids"],
}))
"""


def _convert(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "unires_jax.cli.convert", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def _params(model) -> dict[str, np.ndarray]:
  return {path: np.asarray(var[...]) for path, var in torch_io.iter_params(model)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(config, model, its converted checkpoint, that checkpoint through `to-pytorch`)."""
  root = tmp_path_factory.mktemp("convert_cli")
  config = load_config("tiny")
  tokenizer_lib.train_tokenizer([*tokenizer_lib.PROMPT_WORDS, TEXT], 128, str(root / "tok"))
  model = models.build_model(config, nnx.Rngs(0))
  checkpoint.save_converted(nnx.state(model, nnx.Param), config, str(root / "ckpt"),
                            tokenizer_dir=str(root / "tok"))
  run = _convert("to-pytorch", f"--checkpoint={root / 'ckpt'}", f"--out={root / 'pt'}",
                 "--group_mb=1")
  assert run.returncode == 0, run.stderr
  assert "llm: 21 tensors, 0.3 MiB" in run.stdout and "peak host memory" in run.stdout, run.stdout
  print(run.stdout)
  return config, model, root


@pytest.mark.slow
def test_export_loads_in_a_fresh_pytorch_process_and_converts_back(exported, tmp_path):
  config, model, root = exported
  rng = np.random.default_rng(0)
  tokenize = tokenizer_lib.load_tokenizer(str(root / "tok"))
  ids = np.array([tokenize(TEXT, add_special_tokens=False)["input_ids"] + [137, 128]])
  pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  image_high = rng.normal(size=(1, 3, 64, 64)).astype(np.float32)
  np.savez(tmp_path / "inputs.npz", ids=ids, pixels=pixels, image_high=image_high)
  run = subprocess.run(
      [sys.executable, "-c", PYTORCH_USER, str(root / "pt"), str(tmp_path / "inputs.npz"),
       str(tmp_path / "outputs.npz"), TEXT], cwd=tmp_path, capture_output=True, text=True,
      timeout=600, check=False)
  assert run.returncode == 0, run.stderr
  report = json.loads(run.stdout.strip().splitlines()[-1])
  assert report["modules"] == []  # torch, transformers, timm, safetensors: nothing of ours
  assert sorted(report["missing"]) == ["head.norm.bias", "head.norm.weight"]  # timm's classifier
  special = prompt.SpecialTokens.appended_to(config.model.llm.vocab_size)
  assert report["special_ids"] == [special.image_start, special.seg]
  assert report["text_ids"] == ids[0, :-2].tolist()

  theirs = np.load(tmp_path / "outputs.npz")
  vision = model.vision(pixels.transpose(0, 2, 3, 1))
  for i, hidden in enumerate(vision.hidden_states):
    np.testing.assert_allclose(theirs[f"hidden{i}"], hidden, atol=ATOL, rtol=0, err_msg=str(i))
  logits, _, _ = model.llm(ids)
  np.testing.assert_allclose(theirs["logits"], logits, atol=ATOL, rtol=0)
  for i, stage in enumerate(model.convnext(image_high.transpose(0, 2, 3, 1))):
    np.testing.assert_allclose(theirs[f"stage{i}"], np.asarray(stage).transpose(0, 3, 1, 2),
                               atol=ATOL, rtol=0, err_msg=str(i))

  # PyTorch -> Orbax through the command line: bit-identical to the checkpoint we started from.
  pt = root / "pt"
  run = _convert("from-pytorch", "--config=configs/tiny.py", f"--vision={pt / 'vision_tower'}",
                 f"--convnext={pt / 'high_res_encoder'}", f"--llm={pt / 'llm'}",
                 f"--heads={pt / convert_unires.HEADS_FILE}", f"--out={tmp_path / 'back'}")
  assert run.returncode == 0, run.stderr
  where = checkpoint.locate(str(tmp_path / "back"))
  ours = _params(model)
  back = checkpoint.read_params(where, sorted(ours))
  for path, value in ours.items():
    np.testing.assert_array_equal(back[path], value, err_msg=path)
  assert tokenizer_lib.load_tokenizer(where.config().input.tokenizer).convert_tokens_to_ids(
      "[SEG]") == special.seg


@pytest.mark.slow
def test_released_weights_and_wrong_inputs(exported, tmp_path):
  config, model, root = exported
  pt = root / "pt"
  paths = dict(vision_dir=str(pt / "vision_tower"), convnext_file=str(pt / "high_res_encoder"))

  # A released LLaMA (base vocabulary only): its rows are loaded, the added rows and every new
  # part are freshly initialised.
  base = tmp_path / "released_llm"
  shutil.copytree(pt / "llm", base)
  tensors = safetensors.numpy.load_file(base / "model.safetensors")
  vocab = config.model.llm.vocab_size
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    tensors[name] = tensors[name][:vocab]
  safetensors.numpy.save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
  hf = json.loads((base / "config.json").read_text())
  (base / "config.json").write_text(json.dumps({**hf, "vocab_size": vocab}))
  fresh = _params(convert_unires.import_released(config, llm_dir=str(base), seed=3, **paths))
  ours = _params(model)
  np.testing.assert_array_equal(fresh["llm/model/embed_tokens/embedding"][:vocab],
                                ours["llm/model/embed_tokens/embedding"][:vocab])
  assert not np.array_equal(fresh["llm/model/embed_tokens/embedding"][vocab:],
                            ours["llm/model/embed_tokens/embedding"][vocab:])
  assert not np.array_equal(fresh["no_target_head/fc1/kernel"],
                            ours["no_target_head/fc1/kernel"])
  for path in ours:
    if path.startswith(("vision/", "convnext/", "llm/model/layers/")):
      np.testing.assert_array_equal(fresh[path], ours[path], err_msg=path)

  # A LLaMA of another width than the config: the command names the field, writes nothing.
  wide = tmp_path / "wide_llm"
  shutil.copytree(pt / "llm", wide)
  (wide / "config.json").write_text(json.dumps({**hf, "hidden_size": 96}))
  run = _convert("from-pytorch", "--config=configs/tiny.py", f"--vision={paths['vision_dir']}",
                 f"--convnext={paths['convnext_file']}", f"--llm={wide}",
                 f"--out={tmp_path / 'out'}")
  assert run.returncode != 0
  assert "llm config field 'hidden_size' is 64 but the checkpoint's config.json says 96" in (
      run.stderr)
  assert not (tmp_path / "out").exists()

  # A heads file without one tensor; a truncated safetensors file.
  heads = safetensors.numpy.load_file(pt / convert_unires.HEADS_FILE)
  del heads["no_target_head/fc2/bias"]
  safetensors.numpy.save_file(heads, tmp_path / "heads.safetensors")
  with pytest.raises(torch_io.CheckpointError, match=r"heads.safetensors: tensor "
                                                     r"'no_target_head/fc2/bias' is missing"):
    convert_unires.import_released(config, llm_dir=str(pt / "llm"),
                                   heads_file=str(tmp_path / "heads.safetensors"), **paths)
  broken = tmp_path / "broken_llm"
  shutil.copytree(pt / "llm", broken)
  with open(broken / "model.safetensors", "r+b") as f:
    f.truncate(os.path.getsize(broken / "model.safetensors") // 2)
  with pytest.raises(torch_io.CheckpointError, match="model.safetensors: not a readable "
                                                     "safetensors file"):
    convert_unires.import_released(config, llm_dir=str(broken), **paths)

  # to-pytorch never writes into an existing directory.
  run = _convert("to-pytorch", f"--checkpoint={root / 'ckpt'}", f"--out={pt}")
  assert run.returncode != 0 and "already exists" in run.stderr
  assert sorted(os.listdir(pt)) == ["config.json", "high_res_encoder", "llm",
                                    convert_unires.HEADS_FILE, "vision_tower"]
