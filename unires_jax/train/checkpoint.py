"""Orbax checkpoints of the train state together with the Grain iterator's position.

A checkpoint `workdir/checkpoints/<step>/` holds `state` (the sharded `TrainState`; each process
writes its own shards) and `data` (every process's input-iterator state). Orbax writes into a
temporary folder and renames it when complete, so a run killed at any moment leaves only complete
checkpoints behind; `latest_step()` sees complete ones only. Saves are asynchronous: the step loop
goes on while the arrays are written.

Restoring takes an abstract state carrying the *current* mesh's shardings, so a checkpoint saved
on one mesh (e.g. data=8) restores onto another (e.g. fsdp=4, tensor=2).

A run's `config.json` sits beside its `checkpoints/`. A converted checkpoint (`unires-convert
from-pytorch`) holds the parameters alone. `locate` finds the parameters in either,
`restore_params` restores them sharded, `param_shapes` / `read_params` read them tensor by tensor
on the host (conversion to PyTorch).
"""

import dataclasses
import os
import shutil
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from unires_jax import config_lib, parallel
from unires_jax.convert import torch_io
from unires_jax.train.state import TrainState

PARAMS_DIR = "params"  # a converted checkpoint: params/ (Orbax) + config.json (+ tokenizer/)
TOKENIZER_DIR = "tokenizer"


class Checkpointer:
  """Saves every `save_every` steps, keeps the newest `keep`.

  Args:
    directory: where the step folders go (created if absent).
    save_every: `save()` writes only at multiples of it (unless forced).
    keep: how many checkpoints to keep (older ones are deleted).
    async_save: write in a background thread.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    if save_every < 1 or keep < 1:
      raise ValueError(f"checkpoint_every={save_every} and keep_checkpoints={keep} must be >= 1")
    self.directory = os.path.abspath(directory)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        # Multiples of `save_every` and preemption (Orbax's default also saves a run's first
        # step, which costs a save for nothing).
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_iterator: Any | None,
           *, force: bool = False) -> bool:
    """Saves `state` (and the iterator's position) as step `step` when due (or `force`)."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: TrainState, data_iterator: Any | None,
              step: int | None = None) -> TrainState:
    """The state of `step` (default: the latest) placed as `abstract_state`'s shardings say;
    `data_iterator` (when given) is moved to where the saved one was."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _step_dirs(directory: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n, "state")))


@dataclasses.dataclass(frozen=True)
class Located:
  """Where a checkpoint's parameters are on disk (`locate`).

  tree_dir: the Orbax PyTree directory holding them.
  prefix:   the keys above the parameters in that tree (`("params",)` in a train state,
            `()` in a converted checkpoint).
  step:     the training step, None for a converted checkpoint.
  run_dir:  the directory with the run's `config.json` (and a converted checkpoint's `tokenizer/`).
  """

  tree_dir: str
  prefix: tuple[str, ...]
  step: int | None
  run_dir: str

  @property
  def converted(self) -> bool:
    return self.step is None

  def config(self) -> ml_collections.ConfigDict:
    """The config the parameters were trained or converted with (`run_dir/config.json`); a
    `tokenizer/` beside it becomes `input.tokenizer`, so the directory can move."""
    try:
      config = config_lib.read_config_json(self.run_dir)
    except FileNotFoundError:
      raise FileNotFoundError(
          f"no {config_lib.CONFIG_FILE} in {self.run_dir}: the trainer and unires-convert write "
          "it; for an older run give the training config explicitly") from None
    tokenizer = os.path.join(self.run_dir, TOKENIZER_DIR)
    if os.path.isdir(tokenizer):
      config.input.tokenizer = tokenizer
    return config


def locate(path: str, step: int | None = None) -> Located:
  """Finds the parameters under `path`: a converted checkpoint (`unires-convert from-pytorch`:
  `params/` + `config.json`), a training work directory (`checkpoints/<step>/state`) or its
  `checkpoints` directory. `step` picks a training step (default: the latest complete one)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    if step is not None:
      raise ValueError(f"{path} is a converted checkpoint (no training steps); drop the step")
    return Located(os.path.join(path, PARAMS_DIR), (), None, path)
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    directory = path
  if not os.path.isdir(directory) or not _step_dirs(directory):
    raise FileNotFoundError(
        f"no checkpoint in {path}: expected a converted checkpoint ({PARAMS_DIR}/ and "
        f"{config_lib.CONFIG_FILE}), a training work directory or its checkpoints/ directory")
  steps = _step_dirs(directory)
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory} (it has {steps})")
  return Located(os.path.join(directory, str(step), "state"), ("params",), step,
                 os.path.dirname(directory))


def restore_params(path: str, abstract_state: TrainState, step: int | None = None
                   ) -> tuple[Any, int | None]:
  """(params, step) of a checkpoint `locate` finds under `path` (step None for a converted one),
  placed as `abstract_state`'s shardings say: each process reads only its own shards, and the
  rest of a train state (the optimizer's moments) is not read."""
  where = locate(path, step)
  check_shapes(where, abstract_state.params)
  item, restore_args = abstract_state.params, ocp.checkpoint_utils.construct_restore_args(
      abstract_state.params)
  for key in reversed(where.prefix):
    item, restore_args = {key: item}, {key: restore_args}
  tree = ocp.PyTreeCheckpointer().restore(where.tree_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  for key in where.prefix:
    tree = tree[key]
  return tree, where.step


def param_shapes(where: Located) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{"llm/model/norm/scale": (shape, dtype)} of every parameter, from the metadata alone."""
  tree = ocp.PyTreeCheckpointer().metadata(where.tree_dir).item_metadata.tree
  for key in where.prefix:
    tree = tree[key]
  flat = {}
  for keys, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = parallel.path_str(keys)
    if not name.endswith("/value"):
      raise ValueError(f"{where.tree_dir}: unexpected leaf {name} (not a parameter)")
    flat[name.removesuffix("/value")] = (tuple(meta.shape), np.dtype(meta.dtype))
  return flat


def check_shapes(where: Located, abstract_params: Any) -> None:
  """Raises a ValueError naming the first parameter whose shape differs between the checkpoint
  and `abstract_params` (the model of the config), or that only one of them has."""
  saved = param_shapes(where)
  wanted = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    wanted[parallel.path_str(keys).removesuffix("/value")] = tuple(leaf.shape)
  for name in sorted(saved.keys() | wanted.keys()):
    have, want = saved.get(name, (None,))[0], wanted.get(name)
    if have != want:
      raise ValueError(
          f"{where.tree_dir}: parameter {name!r} is " + (f"{have} in the checkpoint" if have
                                                        else "missing in the checkpoint")
          + (f", {want} in the config's model" if want else ", not in the config's model")
          + " (a checkpoint of another config?)")


def read_params(where: Located, paths: list[str]) -> dict[str, np.ndarray]:
  """The parameters `paths` (as `param_shapes` names them) as host NumPy arrays, read alone:
  nothing else of the checkpoint is loaded and no device holds them."""
  item: dict[str, Any] = {}
  for path in paths:
    node = item
    for key in (*where.prefix, *path.split("/")):
      node = node.setdefault(key, {})
    node["value"] = 0
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  tree = ocp.PyTreeCheckpointer().restore(
      where.tree_dir,
      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  out = {}
  for path in paths:
    node = tree
    for key in (*where.prefix, *path.split("/")):
      node = node[key]
    out[path] = node["value"]
  return out


def save_converted(params: Any, config: ml_collections.ConfigDict, out_dir: str,
                   tokenizer_dir: str | None = None) -> None:
  """Writes a converted checkpoint as a new directory: `params/` (Orbax, the model's `nnx.State`
  of parameters), `config.json` and, when given, `tokenizer/` (a copy of `tokenizer_dir`, which
  `Located.config` makes the config's tokenizer). Written into a temporary sibling renamed at the
  end: a failure leaves nothing at `out_dir`."""
  with torch_io.new_directory(out_dir) as tmp:
    if tokenizer_dir:
      shutil.copytree(tokenizer_dir, os.path.join(tmp, TOKENIZER_DIR))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
    checkpointer.wait_until_finished()
    config_lib.write_config_json(config, tmp)
