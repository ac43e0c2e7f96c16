"""unires-serve: the web demo, a page that segments uploaded images with a checkpoint.

  unires-serve --checkpoint=RUN [--detector=OWLV2_DIR] [--port=7860] [--host=127.0.0.1]
      [--save_dir=DIR] [--batch_size=8] [--max_upload_mb=20] [--max_pixels=40000000]
      [--quantize=int8|int4]

The web demo (`unires_jax.serving`): a Gradio page over `inference.Segmenter` on this host's
devices. Upload an image (or pick one of the held-out images when RUN is an `unires-demo` work
directory), type an expression, optionally give boxes; the page shows the overlay, the mask, the
proposals, the no-target verdict with its probability and how long the model took. Inputs
without boxes get `--detector`'s proposals, else the whole image is the one object proposal.

The model is compiled before the server starts listening (a warm-up request); requests that
arrive together are segmented in one model call of `--batch_size` rows, the same shape every
time, so no request compiles again.

It listens on 127.0.0.1 (this machine only) unless `--host` says otherwise: with
`--host=0.0.0.0` anyone who can reach the port can upload images and use the accelerator; there
is no authentication. Uploads and results live in a private temporary folder while the page
needs them (Gradio serves files from there; files older than 10 minutes are deleted every 10
minutes, the folder when the server stops);
only with `--save_dir` is each request kept (`unires_jax.serving.app.save_request`).
"""

import logging
import os
import shutil
import signal
import tempfile
import threading

from absl import app, flags

from unires_jax.cli import common

_PORT = flags.DEFINE_integer("port", 7860, "Port of the web page.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on: 127.0.0.1 is this machine "
                            "only; 0.0.0.0 lets anyone who reaches the port use the demo (no "
                            "authentication).")
_SAVE_DIR = flags.DEFINE_string("save_dir", None, "Keep every request (upload, text, mask, "
                                "overlay) in a new folder here; by default nothing is kept.")
_MAX_UPLOAD_MB = flags.DEFINE_float("max_upload_mb", 20, "Largest upload in megabytes.")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 40_000_000,
                                   "Most pixels (width x height) of an uploaded image.")

log = logging.getLogger(__name__)


def _private_temp_dir() -> str:
  """A new folder only this user reads, in memory (/dev/shm) where the system has it."""
  shm = "/dev/shm"
  return tempfile.mkdtemp(prefix="unires-serve-",
                          dir=shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None)


def main(argv) -> int:
  common.start(argv)
  common.require(common.CHECKPOINT)
  for flag in (_MAX_UPLOAD_MB, _MAX_PIXELS, common.BATCH_SIZE):
    if flag.value <= 0:
      raise app.UsageError(f"--{flag.name}={flag.value} must be positive")
  threshold = common.NO_TARGET_THRESHOLD.value
  if threshold is not None and not 0 < threshold < 1:
    raise app.UsageError(f"--no_target_threshold={threshold} must be in (0, 1)")
  from unires_jax import checkpoint, inference

  try:
    config = checkpoint.locate(common.CHECKPOINT.value, common.STEP.value).config()
  except (OSError, ValueError) as e:
    raise app.UsageError(f"--checkpoint={common.CHECKPOINT.value}: {e}") from None
  detector = (common.load_detector(config, common.DETECTOR.value) if common.DETECTOR.value
              else None)
  segmenter = inference.Segmenter.from_checkpoint(
      common.CHECKPOINT.value, step=common.STEP.value, batch_size=common.BATCH_SIZE.value,
      no_target_threshold=common.NO_TARGET_THRESHOLD.value, detector=detector,
      quantize=common.QUANTIZE.value)
  temp_dir = _private_temp_dir()
  log.info("uploads and results live in %s while the page needs them", temp_dir)
  # Read by Gradio when it is imported: uploads and served results go to `temp_dir`, and no
  # usage statistics are sent.
  os.environ.update(GRADIO_TEMP_DIR=temp_dir, GRADIO_ANALYTICS_ENABLED="False")
  from unires_jax.serving import app as app_lib, batcher as batcher_lib

  try:
    with batcher_lib.Batcher(segmenter) as batcher:
      log.info("compiled the model in %.1f s (batches of %d on %d devices)", batcher.warm_up(),
               segmenter.batch_size, segmenter.mesh.size)
      examples = app_lib.demo_examples(common.CHECKPOINT.value)
      page = app_lib.page(
          batcher, title=f"UniRES++: {os.path.basename(os.path.normpath(common.CHECKPOINT.value))}",
          examples=examples, save_dir=_SAVE_DIR.value, max_pixels=_MAX_PIXELS.value)
      _, url, _ = page.launch(
          server_name=_HOST.value, server_port=_PORT.value, share=False, quiet=True,
          max_file_size=int(_MAX_UPLOAD_MB.value * 2**20), show_error=False, ssr_mode=False,
          footer_links=[], allowed_paths=[os.path.dirname(p) for p, _ in examples[:1]],
          prevent_thread_lock=True)
      log.info("serving on %s (listening on %s)", url, _HOST.value)
      stop = threading.Event()
      signal.signal(signal.SIGTERM, lambda *_: stop.set())
      try:
        stop.wait()
      except KeyboardInterrupt:
        pass
      log.info("stopping")
      page.close()
  finally:
    shutil.rmtree(temp_dir, ignore_errors=True)
  return 0


FLAG_GROUPS = (
    ("model", (common.CHECKPOINT, common.STEP, common.DETECTOR, common.BATCH_SIZE,
               common.NO_TARGET_THRESHOLD, common.QUANTIZE)),
    ("server", (_HOST, _PORT, _SAVE_DIR, _MAX_UPLOAD_MB, _MAX_PIXELS)),
)


def run():
  common.run(main, "unires-serve", __doc__, FLAG_GROUPS)


if __name__ == "__main__":
  run()
