"""Weight-only int8 / int4 inference (`models.quantize`, qwix): the layers compute as qwix's own
PTQ of the model does, stacked layers as unrolled ones; a float checkpoint quantized as it loads
segments as the float model does and as its saved quantized checkpoint does; every command's
`--quantize` reaches the loader."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx
from PIL import Image

from tests import shapes
from tests.cli_runner import run_cli  # pylint: disable=unused-import
from unires_jax import checkpoint, inference, models, utils
from unires_jax.convert import torch_io
from unires_jax.config_lib import load_config
from unires_jax.models import quantize
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.models.unires import INPUT_KEYS
from unires_jax.parallel import sharded_model

TEXT = "the red circle"


def _flat(state) -> dict[str, np.ndarray]:
  return {utils.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _same_integers_but_ties(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray],
                            floats: dict[str, np.ndarray]) -> None:
  """Equal parameters (by path), the quantized integers equal but where the float weight over
  its scale is a tie (x.5: each channel's largest weight maps to +-127.5, or +-7.5 in int4),
  which rounding may send either way."""
  assert ours.keys() == theirs.keys()
  for name, value in ours.items():
    if "/qvalue" not in name:
      np.testing.assert_allclose(value, theirs[name], rtol=1e-6, err_msg=name)
      continue
    scale = ours[name.replace("/qvalue", "/scale")]
    ratio = floats[name.replace("/array/qvalue", "")] / np.repeat(
        scale, value.shape[-2] // scale.shape[-2], axis=-2)
    tie = np.abs(np.abs(ratio % 1) - 0.5) < 1e-4
    step = np.abs(value.astype(np.int32) - theirs[name].astype(np.int32))
    assert step.max() <= 1 and not step[~tie].any(), name


# One jitted function for every forward: a model of a graph already seen (the unrolled model with
# qwix's parameters, or with the stacked one's) reuses its compiled program.
_call = nnx.jit(lambda m, b: m(b))


def _forward(model: nnx.Module, batch) -> np.ndarray:
  out = _call(model, batch)
  return np.concatenate([np.asarray(out.mask_logits).ravel(),
                         np.asarray(out.no_target_logits).ravel()])


@pytest.mark.parametrize("weights,tile_size", [("int8", 0), ("int4", 16)])
def test_quantized_layers_compute_as_qwix_ptq_and_stacked_as_unrolled(weights, tile_size):
  config = load_config(shapes.CONFIG)
  config.model.quantize.update(weights=weights, parts="llm,vision,convnext", tile_size=tile_size)
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(config.model, 2).items()
           if k in INPUT_KEYS}
  float_config = config.copy_and_resolve_references()
  float_config.model.quantize.weights = "none"
  float_model = sharded_model.build(float_config)
  # sharded_model.build quantizes as config.model.quantize says; the same float weights.
  unrolled = nnx.jit(lambda: sharded_model.build(config))()

  # qwix's own PTQ: it runs the model once and quantizes each weight its rule matches.
  targets = [p for p, m in nnx.iter_modules(float_model) if isinstance(m, nnx.Linear)
             and p[0] in ("llm", "vision", "convnext")]
  # Every CLIP and LLaMA projection and ConvNeXt MLP (the LM head too: it is not called here).
  assert len(targets) == 2 * 6 + 1 * 7 + 1 + 4 * 2
  rule = qwix.QuantizationRule(module_path="|".join("/".join(map(str, p)) for p in targets),
                               weight_qtype=quantize.WEIGHT_TYPES[weights],
                               op_names=("dot_general",),
                               tile_size=tile_size or None)
  theirs = nnx.jit(lambda m, b: qwix.quantize_model(m, qwix.PtqProvider([rule]), b))(
      float_model, batch)
  ours_params, theirs_params = (_flat(nnx.state(m, nnx.Param)) for m in (unrolled, theirs))
  floats = _flat(nnx.state(float_model, nnx.Param))
  assert ours_params.keys() == theirs_params.keys()
  _same_integers_but_ties(ours_params, theirs_params, floats)
  # With the same integers, the same outputs: our model computes as qwix's PTQ model does.
  ours_out = _forward(unrolled, batch)
  np.testing.assert_allclose(
      _forward(nnx.merge(nnx.graphdef(unrolled), nnx.state(theirs, nnx.Param)), batch),
      _forward(theirs, batch), rtol=1e-6, atol=1e-6)
  # Quantization moved the outputs, by more at 4 bits than at 8.
  moved = np.abs(ours_out - _forward(float_model, batch)).max() / np.abs(ours_out).max()
  assert (1e-4 < moved < 0.02) if weights == "int8" else (0.01 < moved < 0.2), moved

  # Stacked layers (scan_layers) quantize each layer with its own scales, as unrolled ones: the
  # same integers (ties aside), and laid out unrolled by the converters, the same outputs.
  config.model.scan_layers = True
  stacked = nnx.jit(lambda: sharded_model.build(config))()
  layers_of = {path: torch_io.read_unstacked(var, index)
               for path, (var, index) in torch_io.unstacked_params(stacked).items()}
  _same_integers_but_ties(layers_of, {k.removesuffix("/value"): v for k, v in ours_params.items()},
                          {k.removesuffix("/value"): v for k, v in floats.items()})
  torch_io.assign_params(unrolled, layers_of, "the stacked model")
  np.testing.assert_allclose(_forward(unrolled, batch), _forward(stacked, batch), rtol=1e-5,
                             atol=1e-5)

  kinds = {}
  for name, value in _flat(nnx.state(stacked, nnx.Param)).items():
    kinds.setdefault(value.dtype.name, set()).add(name.split("/")[0])
  assert kinds[weights] == {"llm", "vision", "convnext"}
  assert {"mask_decoder", "no_target_head", "image_projector"} <= kinds["float32"]


@pytest.fixture(scope="module")
def converted(shapes_root, tmp_path_factory):
  """A converted float32 checkpoint of the tiny model (random weights, the no-target prior
  lowered by 10 so that masks show) with the ShapesParts tokenizer, and a val image."""
  root = tmp_path_factory.mktemp("quantize")
  config = load_config(f"{shapes.CONFIG}:{shapes_root}")
  model = models.build_model(config, nnx.Rngs(0))
  bias = model.no_target_head.fc2.bias
  bias.set_value(bias.get_value() - 10.0)
  checkpoint.save_converted(nnx.state(model, nnx.Param), config, str(root / "ckpt"),
                            tokenizer_dir=config.input.tokenizer)
  image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
  Image.fromarray(image).save(root / "image.png")
  return root


def _kernels(params) -> dict[str, jax.Array]:
  """The kernels of the LLM's and the CLIP ViT's linear layers (quantized: qvalue and scale)."""
  flat = ((utils.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0])
  return {p: x for p, x in flat if p.split("/")[0] in ("llm", "vision") and "/kernel/" in p}


def test_int8_segments_as_float_and_its_saved_checkpoint_loads_as_stored(converted, run_cli):
  ckpt, image = str(converted / "ckpt"), np.asarray(Image.open(converted / "image.png"))
  float_seg = inference.Segmenter.from_checkpoint(ckpt, batch_size=1)
  int8_seg = inference.Segmenter.from_checkpoint(ckpt, batch_size=1, quantize="int8")
  dtypes = {utils.path_str(p): x.dtype for p, x in
            jax.tree_util.tree_flatten_with_path(int8_seg.params)[0]}
  assert dtypes["llm/model/layers/0/mlp/up_proj/kernel/array/qvalue/value"] == jnp.int8
  assert dtypes["vision/encoder/layers/0/self_attn/q_proj/kernel/array/qvalue/value"] == jnp.int8
  assert dtypes["mask_decoder/seg_proj/layers/0/kernel/value"] == jnp.float32
  # The quantized kernels: a byte per weight instead of four, and a scale per output channel.
  quantized, floats = _kernels(int8_seg.params), _kernels(float_seg.params)
  assert floats.pop("vision/embeddings/patch_embedding/kernel/value").ndim == 4  # a convolution
  assert 4 * sum(x.nbytes for p, x in quantized.items() if "/qvalue/" in p) == sum(
      x.nbytes for x in floats.values())
  assert sum(x.size for p, x in quantized.items() if "/scale/" in p) == sum(
      x.shape[-1] for x in floats.values())
  (f32,), (q8,) = float_seg.segment([image], [TEXT]), int8_seg.segment([image], [TEXT])
  assert f32.no_target == q8.no_target is False
  assert abs(f32.no_target_prob - q8.no_target_prob) < 0.01
  inter, union = (f32.mask & q8.mask).sum(), (f32.mask | q8.mask).sum()
  assert union > 0 and inter / union > 0.97, inter / union

  out = str(converted / "int8")
  status, stdout, err = run_cli("convert", "quantize", f"--checkpoint={ckpt}", "--quantize=int8",
                                f"--out={out}")
  assert status == 0, err
  assert f"wrote {out}: int8 weights in llm,vision" in stdout
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model"]["quantize"]["weights"] == "int8"
  stored = inference.Segmenter.from_checkpoint(out, batch_size=1)
  jax.tree.map(np.testing.assert_array_equal, stored.params, int8_seg.params)
  (again,) = stored.segment([image], [TEXT])
  assert (again.mask == q8.mask).all() and again.no_target_prob == q8.no_target_prob
  with pytest.raises(ValueError, match="holds int8 weights .* cannot become int4"):
    inference.Segmenter.from_checkpoint(out, quantize="int4")


def test_each_commands_quantize_flag_reaches_the_loader(converted, shapes_root, run_cli,
                                                        tmp_path):
  """unires-segment quantizes as the Segmenter does; unires-eval evaluates the quantized model
  (within a hair of the float one on ShapesParts' held-out split); unires-serve and
  unires-segment refuse to re-quantize a quantized checkpoint before anything runs."""
  ckpt = str(converted / "ckpt")
  mask = str(tmp_path / "mask.png")
  status, stdout, err = run_cli("segment", f"--checkpoint={ckpt}", "--quantize=int4",
                                f"--image={converted / 'image.png'}", f"--text={TEXT}",
                                f"--out={mask}")
  assert status == 0, err
  int4 = inference.Segmenter.from_checkpoint(ckpt, batch_size=1, quantize="int4")
  (expected,) = int4.segment([np.asarray(Image.open(converted / "image.png"))], [TEXT])
  assert (np.asarray(Image.open(mask)) > 0).tolist() == expected.mask.tolist()

  config = f"--config={shapes.CONFIG}:{shapes_root}"
  metrics = {}
  for weights in ("none", "int8"):  # both at one threshold, given as unires-eval's flag
    status, _, err = run_cli("eval", f"--workdir={ckpt}", config, f"--quantize={weights}",
                             "--no_target_threshold=0.375")
    assert status == 0, err
    with open(os.path.join(ckpt, "eval", "shapes_parts_val_0.json"), encoding="utf-8") as f:
      record = json.load(f)
    assert record["no_target_threshold"] == 0.375
    metrics[weights] = record["metrics"]
  assert metrics["int8"]["mIoU"] == pytest.approx(metrics["none"]["mIoU"], abs=0.02)

  status, _, _ = run_cli("convert", "quantize", f"--checkpoint={ckpt}", "--quantize=int8",
                         f"--out={tmp_path / 'int8'}")
  assert status == 0
  for program, extra in (("serve", []), ("segment", [f"--image={converted / 'image.png'}",
                                                     f"--text={TEXT}", f"--out={mask}"])):
    status, _, err = run_cli(program, f"--checkpoint={tmp_path / 'int8'}", "--quantize=int4",
                             *extra)
    assert status == 2
    assert "holds int8 weights (unires-convert quantize), which cannot become int4" in err, err
