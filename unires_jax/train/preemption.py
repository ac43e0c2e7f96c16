"""SIGTERM (how a TPU VM announces preemption) -> save a checkpoint and exit cleanly.

The handler only records the signal; the step loop asks `requested(step)` between steps. With
several processes they must stop at the same step, so the flags are OR-ed across processes.
"""

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Context manager that turns SIGTERM into a stop request (the previous handler comes back on
  exit). Only the main thread can install signal handlers; elsewhere the guard is inert."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._event.set())
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def requested(self, step: int) -> bool:
    """Whether any process got SIGTERM (a collective: every process calls it at every step).

    With `jax.distributed`, JAX installs its own SIGTERM handler and agrees on a step to stop at
    (`reached_preemption_sync_point`); both signals count.
    """
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    anyone = bool(np.any(multihost_utils.process_allgather(np.array(local))))
    return anyone or multihost_utils.reached_preemption_sync_point(step)
