"""The tiny train step, compiled once per worker for the tests that train it in-process.

Compiling the tiny step costs about half a CPU-minute per mesh, running it a fraction of a second.
The sharded-step parity test, the checkpoint tests and the sharded checkpoint conversion each
used to build their own `StateFactory` and step (and trace, lower and compile them again); they
now take the session fixture `tiny_steps` (tests/conftest.py) and share one worker
(`xdist_group(GROUP)`), so each mesh's initialisation and step compile once between them.
"""

import jax
import numpy as np

from unires_jax import parallel
from unires_jax.config_lib import load_config
from unires_jax.models.synthetic import synthetic_batch
from unires_jax.train import step as step_lib
from unires_jax.train.state import StateFactory

GROUP = "tiny_step"  # the xdist_group of every test that takes `tiny_steps`
BATCH = 8  # rows of every batch these tests step on: one compiled program per mesh
MESHES = {"single": dict(data=1, fsdp=1, tensor=1),  # device 0 alone
          "2x2x2": dict(data=2, fsdp=2, tensor=2)}  # the 8 emulated devices, every axis > 1


def tiny_step_config():
  """The tiny config, everything trained (stage 1 would freeze both vision encoders, leaving
  their paths out of the gradients), no warmup: the first step moves every parameter."""
  config = load_config("configs/tiny.py")
  config.train.num_steps = 10
  config.optimizer.update(learning_rate=1e-3, warmup_steps=0)
  config.optimizer.lr_multipliers = {"llm/model/embed_tokens": 0.5}
  return config


class TinySteps:
  """Per mesh of `MESHES`, made on first use: the `StateFactory`, the jitted train step (the
  state donated) and the initial state, kept on the host so that every test starts from a
  fresh copy of the same bits without initialising again."""

  def __init__(self):
    self.config = tiny_step_config()
    self._factories, self._steps, self._initial = {}, {}, {}

  def mesh(self, name: str):
    return self.factory(name).mesh

  def factory(self, name: str) -> StateFactory:
    if name not in self._factories:
      devices = jax.devices()[:1] if name == "single" else None
      self._factories[name] = StateFactory(
          self.config, parallel.make_mesh(MESHES[name], devices=devices))
    return self._factories[name]

  def step(self, name: str):
    """`(state, batch) -> (state, metrics)` on this mesh; the state is donated."""
    if name not in self._steps:
      self._steps[name] = step_lib.make_train_step(self.factory(name))
    return self._steps[name]

  def initial_state(self, name: str):
    """A new copy of the freshly initialised state (`StateFactory.create`, made once), placed
    as the factory's shardings."""
    factory = self.factory(name)
    if name not in self._initial:
      self._initial[name] = jax.tree_util.tree_map(np.asarray, jax.device_get(factory.create()))
    return jax.device_put(self._initial[name], factory.shardings)

  def batch(self, name: str, seed: int) -> dict[str, jax.Array]:
    """`BATCH` synthetic rows (every third without a target), sharded over this mesh."""
    rows = synthetic_batch(self.config.model, BATCH, seed=seed, no_target_every=3)
    return parallel.shard_batch(step_lib.model_fields(rows), self.mesh(name))
