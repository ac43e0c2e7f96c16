"""Orbax checkpoints of the train state together with the Grain iterator's position.

A checkpoint `workdir/checkpoints/<step>/` holds `state` (the sharded `TrainState`; each process
writes its own shards) and `data` (every process's input-iterator state). Orbax writes into a
temporary folder and renames it when complete, so a run killed at any moment leaves only complete
checkpoints behind; `latest_step()` sees complete ones only. Saves are asynchronous: the step loop
goes on while the arrays are written.

Restoring takes an abstract state carrying the *current* mesh's shardings, so a checkpoint saved
on one mesh (e.g. data=8) restores onto another (e.g. fsdp=4, tensor=2).

Reading the parameters alone (evaluation, inference, conversion) is `unires_jax.checkpoint`'s.
"""

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from unires_jax import checkpoint
from unires_jax.train.state import TrainState


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
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={checkpoint.STATE_DIR: checkpoint.pytree_handler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_iterator: Any | None,
           *, force: bool = False) -> bool:
    """Saves `state` (and the iterator's position) as step `step` when due (or `force`)."""
    items = {checkpoint.STATE_DIR: ocp.args.PyTreeSave(state)}
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
    items = {checkpoint.STATE_DIR: ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[checkpoint.STATE_DIR]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
