"""A model's parameters on disk: a training run's checkpoints or a converted checkpoint.

Two layouts hold parameters:
  * a training work directory: `config.json` beside `checkpoints/<step>/state`, the Orbax PyTree
    of a train state whose `params` entry is the model's `nnx.State` of parameters
    (`unires_jax.train.checkpointer` writes it);
  * a converted checkpoint (`unires-convert from-pytorch`, `save_converted`): `params/` (Orbax, the
    `nnx.State` alone), `config.json` and, when there is one, `tokenizer/`.
`locate` finds the parameters in either; `restore_params` restores them sharded onto a mesh (each
process reads its own shards, nothing else of a train state is read: no optimizer is needed);
`param_shapes` / `read_params` read them tensor by tensor on the host (conversion to PyTorch).

Beside the parameters a checkpoint may hold `no_target_calibration.json`, the no-target threshold
chosen on a calibration split (`unires_jax.evaluation.calibration` writes it): in the step
folder of a training checkpoint, in the directory of a converted one. `Located.config()` reads it
as `model.no_target_threshold`, so everything that loads the checkpoint uses it by default.
"""

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
# The store of the per-array metadata that Orbax's default jax.Array handler writes (no public
# name in orbax-checkpoint 0.12.8); `pytree_handler` keeps it.
from orbax.checkpoint._src.metadata import array_metadata_store

from unires_jax import config_lib, utils

log = logging.getLogger(__name__)

PARAMS_DIR = "params"  # a converted checkpoint: params/ (Orbax) + config.json (+ tokenizer/)
TOKENIZER_DIR = "tokenizer"
STATE_DIR = "state"  # the train state's item in a training checkpoint's step folder
# The no-target calibration: beside STATE_DIR in a step folder, beside a converted PARAMS_DIR.
CALIBRATION_FILE = "no_target_calibration.json"

# Orbax writes an array that several devices hold whole in slices, one per replica
# ("replica-parallel"), each cut out by an eager `slice` that compiles once per shape in each
# process. For small arrays that costs more than the write: the tiny train state's first save on
# 8 CPU devices took 16.6 s (328 slices compiled) and each later one 4.8 s, against 2.0 s each
# with this floor. Below it one replica writes the array; larger ones are still split.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def pytree_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler with its standard type handlers, the jax.Array one splitting only
  arrays whose per-replica slice holds `MIN_REPLICA_SLICE_BYTES` or more (a handler registry of
  its own: Orbax's global one is left as it is)."""
  registry = ocp.type_handlers.create_type_handler_registry(
      *[(ty, ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types() if ty is not jax.Array],
      (jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
          array_metadata_store=array_metadata_store.Store())))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _step_dirs(directory: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n, STATE_DIR)))


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

  @property
  def calibration_path(self) -> str:
    """Where this checkpoint's no-target calibration is (or goes): beside its Orbax tree."""
    return os.path.join(os.path.dirname(self.tree_dir), CALIBRATION_FILE)

  def calibration(self) -> dict[str, Any] | None:
    """The no-target calibration stored with the checkpoint (see the module doc), or None."""
    path = self.calibration_path
    if not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      try:
        record = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); delete it to use the config's threshold, "
                         "or calibrate again") from None
    threshold = record.get("no_target_threshold") if isinstance(record, dict) else None
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
      raise ValueError(f"{path}: no_target_threshold must be a number in (0, 1), got "
                       f"{threshold!r}")
    return record

  def config(self) -> ml_collections.ConfigDict:
    """The config the parameters were trained or converted with (`run_dir/config.json`); a
    `tokenizer/` beside it becomes `input.tokenizer`, so the directory can move, and a stored
    no-target calibration becomes `model.no_target_threshold`."""
    try:
      config = config_lib.read_config_json(self.run_dir)
    except FileNotFoundError:
      raise FileNotFoundError(
          f"no {config_lib.CONFIG_FILE} in {self.run_dir}: the trainer and unires-convert write "
          "it; for an older run give the training config explicitly") from None
    tokenizer = os.path.join(self.run_dir, TOKENIZER_DIR)
    if os.path.isdir(tokenizer):
      config.input.tokenizer = tokenizer
    calibration = self.calibration()
    if calibration is not None:
      config.model.no_target_threshold = float(calibration["no_target_threshold"])
      log.info("no-target threshold %.4f, calibrated on %s %s (%s)",
               config.model.no_target_threshold, calibration.get("dataset"),
               calibration.get("split"), self.calibration_path)
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
  return Located(os.path.join(directory, str(step), STATE_DIR), ("params",), step,
                 os.path.dirname(directory))


def restore_params(path: str, abstract_params: Any, step: int | None = None
                   ) -> tuple[Any, int | None]:
  """(params, step) of a checkpoint `locate` finds under `path` (step None for a converted one).

  `abstract_params`: the model's parameters as ShapeDtypeStructs carrying the shardings to
  restore onto (`parallel.ShardedModel.abstract_sharded()`): each process reads only its own
  shards, and the rest of a train state (the optimizer's moments) is not read.
  """
  where = locate(path, step)
  check_shapes(where, abstract_params)
  item, restore_args = abstract_params, ocp.checkpoint_utils.construct_restore_args(
      abstract_params)
  for key in reversed(where.prefix):
    item, restore_args = {key: item}, {key: restore_args}
  tree = _restore_tree(where, ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                      partial_restore=True))
  for key in where.prefix:
    tree = tree[key]
  return tree, where.step


def _restore_tree(where: Located, args: ocp.args.PyTreeRestore) -> Any:
  """The Orbax tree at `where.tree_dir`, read by the PyTree handler itself: a Checkpointer would
  take that folder for a step folder and warn that it lacks the step's `_CHECKPOINT_METADATA`
  (which the CheckpointManager writes one level up, beside it)."""
  handler = pytree_handler()
  try:
    return handler.restore(epath.Path(where.tree_dir), args=args)
  finally:
    handler.close()


def param_shapes(where: Located) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{"llm/model/norm/scale": (shape, dtype)} of every parameter, from the metadata alone."""
  handler = pytree_handler()  # not a Checkpointer: see `_restore_tree`
  try:
    tree = handler.metadata(epath.Path(where.tree_dir)).tree
  finally:
    handler.close()
  for key in where.prefix:
    tree = tree[key]
  flat = {}
  for keys, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = utils.path_str(keys)
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
    wanted[utils.path_str(keys).removesuffix("/value")] = tuple(leaf.shape)
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
  tree = _restore_tree(where, ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                      partial_restore=True))
  out = {}
  for path in paths:
    node = tree
    for key in (*where.prefix, *path.split("/")):
      node = node[key]
    out[path] = node["value"]
  return out


def save_converted(params: Any, config: ml_collections.ConfigDict, out_dir: str,
                   tokenizer_dir: str | None = None, calibration_file: str | None = None) -> None:
  """Writes a converted checkpoint as a new directory: `params/` (Orbax, the model's `nnx.State`
  of parameters), `config.json` and, when given, `tokenizer/` (a copy of `tokenizer_dir`, which
  `Located.config` makes the config's tokenizer) and the no-target calibration (a copy of
  `calibration_file`). Written into a temporary sibling renamed at the end: a failure leaves
  nothing at `out_dir`."""
  with utils.new_directory(out_dir) as tmp:
    if tokenizer_dir:
      shutil.copytree(tokenizer_dir, os.path.join(tmp, TOKENIZER_DIR))
    if calibration_file:
      shutil.copyfile(calibration_file, os.path.join(tmp, CALIBRATION_FILE))
    checkpointer = ocp.AsyncCheckpointer(pytree_handler())
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    checkpointer.wait_until_finished()
    config_lib.write_config_json(config, tmp)
