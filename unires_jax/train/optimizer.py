"""AdamW with warmup + cosine decay, gradient clipping, per-module learning-rate multipliers.

`config.optimizer.lr_multipliers` maps parameter path prefixes ("vision", "llm/model/
embed_tokens") to a multiplier of the learning rate; the longest matching prefix wins and
everything else gets 1.0. A multiplier of 0 freezes: frozen parameters get no gradient (the train
step differentiates only the trainable ones) and no optimizer state.

LoRA (`config.model.llm.lora.rank > 0`, `unires_jax.models.lora`): the LLM is frozen ("llm": 0.0
unless the table gives "llm" itself), and an adapter parameter (`nnx.LoRAParam`: the adapters
and the LLM's added vocabulary rows) is never frozen by a prefix: where its prefix says 0 it
trains at multiplier 1. So the base weights keep no optimizer state, the adapters, the
special-token rows and the new parts (projectors, mask decoder, heads) train.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from unires_jax.models import lora as lora_lib
from unires_jax.utils import path_str


def lr_multiplier(path: str, multipliers: Mapping[str, float]) -> float:
  """The multiplier of the longest prefix of `path` (whole path components) in `multipliers`."""
  best, value = -1, 1.0
  for prefix, mult in multipliers.items():
    prefix = prefix.strip("/")
    if (path == prefix or path.startswith(prefix + "/")) and len(prefix) > best:
      best, value = len(prefix), float(mult)
  return value


def multipliers_of(config: ml_collections.ConfigDict) -> dict[str, float]:
  """`config.optimizer.lr_multipliers`, with "llm": 0.0 added when LoRA is on."""
  out = dict(config.optimizer.lr_multipliers)
  if lora_lib.read_lora_config(config.model.llm.get("lora")).enabled:
    out.setdefault("llm", 0.0)
  return out


def param_multiplier(path: str, var: nnx.Variable, multipliers: Mapping[str, float]) -> float:
  """The multiplier of the parameter `var` at `path`: its prefix's, 1.0 for an adapter
  parameter (`nnx.LoRAParam`) whose prefix freezes."""
  value = lr_multiplier(path, multipliers)
  return 1.0 if value == 0.0 and isinstance(var, nnx.LoRAParam) else value


def check_multipliers(params: nnx.State, multipliers: Mapping[str, float]) -> None:
  """Raises a ValueError for a negative multiplier or a prefix that matches no parameter."""
  paths = [path_str(p) for p, _ in _variables(params)]
  for prefix, mult in multipliers.items():
    if mult < 0:
      raise ValueError(f"config.optimizer.lr_multipliers[{prefix!r}] = {mult} is negative")
    stripped = prefix.strip("/")
    if not any(p == stripped or p.startswith(stripped + "/") for p in paths):
      tops = sorted({p.split("/")[0] for p in paths})
      raise ValueError(f"config.optimizer.lr_multipliers[{prefix!r}] matches no parameter; "
                       f"top-level modules: {tops}")


def _variables(state: nnx.State):
  return jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def split_trainable(params: nnx.State, multipliers: Mapping[str, float]
                    ) -> tuple[nnx.State, nnx.State]:
  """(trainable, frozen) parts of `params`; frozen = multiplier 0 (`param_multiplier`)."""
  frozen = lambda path, var: param_multiplier(path_str(path), var, multipliers) == 0.0
  frozen_state, trainable = nnx.split_state(params, frozen, ...)
  return trainable, frozen_state


def learning_rate_schedule(opt_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `end_lr_fraction` of it."""
  if not 0 <= opt_cfg.warmup_steps < num_steps:
    raise ValueError(f"config.optimizer.warmup_steps={opt_cfg.warmup_steps} must lie in "
                     f"[0, config.train.num_steps={num_steps})")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=opt_cfg.warmup_steps,
      decay_steps=num_steps, end_value=opt_cfg.learning_rate * opt_cfg.end_lr_fraction)


def make_optimizer(opt_cfg: ml_collections.ConfigDict, num_steps: int, trainable: nnx.State,
                   multipliers: Mapping[str, float]) -> optax.GradientTransformation:
  """The optimizer of the trainable parameters, each at its `param_multiplier`.

  clip_by_global_norm -> AdamW (decoupled weight decay on kernels and embeddings only, i.e.
  parameters with 2+ dimensions) with the schedule scaled by each parameter's multiplier.
  """
  schedule = learning_rate_schedule(opt_cfg, num_steps)
  labels_of = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, v: v.replace(repr(param_multiplier(path_str(path), v, multipliers))), params,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  labels = {v.get_value() for _, v in _variables(labels_of(trainable))}

  def adamw(mult: float) -> optax.GradientTransformation:
    return optax.adamw(
        lambda count: schedule(count) * mult, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
        mask=lambda params: jax.tree_util.tree_map(lambda p: jnp.ndim(p) > 1, params))

  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip_norm),
      optax.multi_transform({label: adamw(float(label)) for label in labels}, labels_of))
