"""The parameter summary: per-component counts from shapes, and the command line."""

import math
import subprocess
import sys

import jax
from flax import nnx

from tests.repo import ROOT as REPO_ROOT
from unires_jax.config_lib import load_config
from unires_jax.models import prompt
from unires_jax.models import summary
from unires_jax.models.clip_vit import CLIPVisionTransformer
from unires_jax.models.convnext import ConvNeXt
from unires_jax.models.llama import LlamaForCausalLM


def _count(factory):
  state = nnx.state(nnx.eval_shape(factory), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def test_7b_components_are_the_backbones_plus_new_parts():
  config = load_config("unires_pp_7b")
  m = config.model
  counts = summary.count_by_component(config)
  assert set(counts) == {"vision", "convnext", "llm", "image_projector", "object_projector",
                         "part_projector", "mask_decoder", "no_target_head"}
  assert counts["vision"] == _count(lambda: CLIPVisionTransformer(m.vision, rngs=nnx.Rngs(0)))
  assert counts["convnext"] == _count(lambda: ConvNeXt(m.convnext, rngs=nnx.Rngs(0)))
  # The LLM gains one embedding row and one lm_head column per special token.
  base_llm = _count(lambda: LlamaForCausalLM(m.llm, rngs=nnx.Rngs(0)))
  assert counts["llm"] == base_llm + 2 * prompt.num_special_tokens() * m.llm.hidden_size
  # Projectors: vision width -> LLM width, then LLM width -> LLM width (mlp2x_gelu).
  width = m.llm.hidden_size
  assert counts["image_projector"] == (m.vision.hidden_size + 1) * width + (width + 1) * width


def test_command_line_prints_a_table():
  out = subprocess.run(
      [sys.executable, "-m", "unires_jax.cli.summary", "--config=configs/tiny.py"],
      cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
  lines = out.strip().splitlines()
  assert lines[0].split() == ["component", "parameters", "share"]
  assert lines[-1].startswith("total")
  rows = {l.split()[0]: int(l.split()[1].replace(",", "")) for l in lines[1:]}
  assert rows["total"] == sum(v for k, v in rows.items() if k != "total")
  assert rows["total"] == sum(summary.count_by_component(load_config("tiny")).values())
