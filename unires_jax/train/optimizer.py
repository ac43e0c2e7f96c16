"""AdamW with warmup + cosine decay, gradient clipping, per-module learning-rate multipliers.

`config.optimizer.lr_multipliers` maps parameter path prefixes ("vision", "llm/model/
embed_tokens") to a multiplier of the learning rate; the longest matching prefix wins and
everything else gets 1.0. A multiplier of 0 freezes: frozen parameters get no gradient (the train
step differentiates only the trainable ones) and no optimizer state.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from unires_jax.utils import path_str


def lr_multiplier(path: str, multipliers: Mapping[str, float]) -> float:
  """The multiplier of the longest prefix of `path` (whole path components) in `multipliers`."""
  best, value = -1, 1.0
  for prefix, mult in multipliers.items():
    prefix = prefix.strip("/")
    if (path == prefix or path.startswith(prefix + "/")) and len(prefix) > best:
      best, value = len(prefix), float(mult)
  return value


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
  """(trainable, frozen) parts of `params`; frozen = multiplier 0."""
  frozen = lambda path, _: lr_multiplier(path_str(path), multipliers) == 0.0
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


def make_optimizer(opt_cfg: ml_collections.ConfigDict, num_steps: int,
                   trainable: nnx.State) -> optax.GradientTransformation:
  """The optimizer of the trainable parameters.

  clip_by_global_norm -> AdamW (decoupled weight decay on kernels and embeddings only, i.e.
  parameters with 2+ dimensions) with the schedule scaled by each parameter's multiplier.
  """
  schedule = learning_rate_schedule(opt_cfg, num_steps)
  multipliers = dict(opt_cfg.lr_multipliers)
  labels_of = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, v: v.replace(repr(lr_multiplier(path_str(path), multipliers))), params,
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
