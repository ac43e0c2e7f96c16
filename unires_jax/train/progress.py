"""A progress bar for the step loop: step, loss, examples/s (tqdm; plain log lines otherwise)."""

import logging
import sys
import time

import jax

log = logging.getLogger(__name__)


class Progress:
  """Shows `step/num_steps`, the last loss and throughput on process 0."""

  def __init__(self, num_steps: int, start: int, global_batch_size: int, show: bool = True):
    self._batch = global_batch_size
    self._t0, self._start = time.perf_counter(), start
    self._last_t, self._last_step = self._t0, start
    self._bar = None
    if show and jax.process_index() == 0:
      from tqdm import tqdm

      self._bar = tqdm(total=num_steps, initial=start, desc="train", unit="step",
                       file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

  def rates(self, step: int) -> dict[str, float]:
    """Examples/s and steps/s since the previous call."""
    now = time.perf_counter()
    dt, ds = now - self._last_t, step - self._last_step
    self._last_t, self._last_step = now, step
    if ds <= 0 or dt <= 0:
      return {}
    return {"steps_per_second": ds / dt, "examples_per_second": ds * self._batch / dt}

  def update(self, step: int, loss: float) -> None:
    elapsed = time.perf_counter() - self._t0
    rate = (step - self._start) * self._batch / max(elapsed, 1e-9)
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:.1f}", refresh=False)
      self._bar.update(step - self._bar.n)
    else:
      log.info("step %d: loss %.4f, %.1f examples/s", step, loss, rate)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
