"""Requests that arrive together, segmented in one model call.

Each web request runs in its own thread and calls `Batcher.segment`, which queues the input and
waits. One worker thread takes the first queued input and every input queued behind it, up to
the segmenter's `batch_size`, and segments them in one `Segmenter.segment` call. It never waits
for more to arrive: a lone request runs at once, and requests that arrive while the model is busy
form the next batch. Every model call has `batch_size` rows (the segmenter pads), so the program
compiled by `warm_up` serves every later request.
"""

import concurrent.futures
import dataclasses
import queue
import threading
import time

import numpy as np

from unires_jax import inference


@dataclasses.dataclass(frozen=True)
class Answer:
  """One request's result and what it cost.

  result:     the segmenter's `Result`
  seconds:    wall time of the model call that served it (preprocessing, proposals, the model,
              the masks at the image's size)
  batch_size: requests served by that call
  """

  result: inference.Result
  seconds: float
  batch_size: int


@dataclasses.dataclass(frozen=True)
class _Job:
  image: np.ndarray
  text: str
  boxes: inference.Boxes | None
  future: concurrent.futures.Future


class Batcher:
  """Groups concurrent `segment` calls into calls of `segmenter.segment` (see the module doc).

  Use as a context manager, or call `close` to stop the worker.
  """

  def __init__(self, segmenter: inference.Segmenter):
    self.segmenter = segmenter
    self._queue: queue.Queue[_Job | None] = queue.Queue()
    self._worker = threading.Thread(target=self._run, name="unires-batcher", daemon=True)
    self._worker.start()

  def __enter__(self) -> "Batcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def warm_up(self) -> float:
    """Compiles the model (and the detector's, when there is one) on a blank image; returns the
    seconds it took."""
    t0 = time.perf_counter()
    self.segment(np.zeros((32, 32, 3), np.uint8), "warm up")
    return time.perf_counter() - t0

  def segment(self, image: np.ndarray, text: str, boxes: inference.Boxes | None = None
              ) -> Answer:
    """Segments `image` `[height, width, 3]` uint8 by `text`, with the proposals `boxes`
    (`inference.parse_boxes`; None: the detector's, or the whole image) once the worker gets to
    it; raises what the segmenter raised."""
    job = _Job(image, text, boxes, concurrent.futures.Future())
    self._queue.put(job)
    return job.future.result()

  def close(self) -> None:
    """Stops the worker after the queued requests."""
    self._queue.put(None)
    self._worker.join()

  def _run(self) -> None:
    while (first := self._queue.get()) is not None:
      jobs = [first]
      while len(jobs) < self.segmenter.batch_size:
        try:
          job = self._queue.get_nowait()
        except queue.Empty:
          break
        if job is None:  # close(): serve what is taken, then stop
          self._queue.put(None)
          break
        jobs.append(job)
      self._serve(jobs)

  def _serve(self, jobs: list[_Job]) -> None:
    t0 = time.perf_counter()
    try:
      results = self.segmenter.segment([j.image for j in jobs], [j.text for j in jobs],
                                       [j.boxes for j in jobs])
    except Exception as e:  # pylint: disable=broad-except  (handed to every caller)
      for job in jobs:
        job.future.set_exception(e)
      return
    seconds = time.perf_counter() - t0
    for job, result in zip(jobs, results):
      job.future.set_result(Answer(result, seconds, len(jobs)))

