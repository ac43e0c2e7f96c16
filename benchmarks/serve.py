r"""What the web demo costs: requests/s and p50 / p95 latency of `unires-serve` for 1 and 8
concurrent clients, beside calling `Segmenter.segment` directly, in one table with the ratio.

  python benchmarks/serve.py --checkpoint=RUN [--clients=1,8] [--requests=32] [--batch_size=8]

What runs: the segmenter of RUN in this process, and `unires-serve --checkpoint=RUN` started as
a subprocess on a free port of 127.0.0.1 (the same devices, batch size and model; no detector:
the whole image is the proposal). Each of `--clients` threads sends its share of `--requests`
(the held-out images and expressions of a demo run, else a noise image) one after another:
to the server through Gradio's HTTP API (the upload, the queue, the three result
images downloaded), or directly as `Segmenter.segment([image], [text])` calls. Direct calls from
several threads are serialised by one lock, as one model would serve them without a batcher; the
server groups the requests that arrive together. Latency is per request, from the client's side;
requests/s is requests / wall time. The ratio is direct requests/s over the server's (above 1:
the server is slower). Both sides are warmed up (compiled) before they are timed.

The client speaks Gradio's REST API with the standard library, as the page does (upload, call,
event stream, downloads): `gradio_client.Client.predict` spends about 0.4 s more per request on
the client's side here, which would be charged to the server.
"""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image

from unires_jax import inference
from unires_jax.serving import app as app_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training work directory or converted "
                                  "checkpoint (an unires-demo run gives real images).")
_CLIENTS = flags.DEFINE_list("clients", ["1", "8"], "Numbers of concurrent clients.")
_REQUESTS = flags.DEFINE_integer("requests", 32, "Timed requests per row (split over clients).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per model call (both sides).")


def _inputs(checkpoint: str, tmp: str) -> list[tuple[str, str]]:
  """(image path, expression) pairs: a demo run's held-out ones, else one noise image."""
  examples = app_lib.demo_examples(checkpoint)
  if examples:
    return [(path, text) for path, text in examples]
  path = os.path.join(tmp, "noise.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8)).save(path)
  return [(path, "the red truck")]


def _run(ask, inputs: list[tuple[str, str]], clients: int, requests: int
         ) -> tuple[float, list[float]]:
  """`clients` threads call `ask(path, text)` for `requests` inputs in all; (wall seconds,
  per-request latencies)."""
  def client(k: int) -> list[float]:
    latencies = []
    for i in range(k, requests, clients):
      t0 = time.perf_counter()
      ask(*inputs[i % len(inputs)])
      latencies.append(time.perf_counter() - t0)
    return latencies

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    latencies = [x for part in pool.map(client, range(clients)) for x in part]
  return time.perf_counter() - t0, latencies


def _start_server(checkpoint: str, log_path: str) -> tuple[subprocess.Popen, str]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with open(log_path, "w", encoding="utf-8") as log:
    process = subprocess.Popen(
        [sys.executable, "-m", "unires_jax.cli.serve", f"--checkpoint={checkpoint}",
         f"--port={port}", f"--batch_size={_BATCH.value}"], stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline and process.poll() is None:
    try:
      with urllib.request.urlopen(url, timeout=5):
        return process, url
    except OSError:
      time.sleep(1)
  process.kill()
  with open(log_path, encoding="utf-8") as f:
    raise RuntimeError(f"unires-serve did not start:\n{f.read()[-3000:]}")


def _post(url: str, body: bytes, content_type: str) -> Any:
  request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
  with urllib.request.urlopen(request, timeout=600) as response:
    return json.load(response)


def _segment_over_http(url: str, data: bytes, name: str, text: str) -> str:
  """One request as the page makes it, through Gradio's REST API: upload the file, call
  /segment, read the result from its event stream, download the three images; returns the
  verdict."""
  boundary = uuid.uuid4().hex
  body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"'
          f"\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
  (path,) = _post(f"{url}gradio_api/upload", body, f"multipart/form-data; boundary={boundary}")
  call = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, text, ""]}
  event = _post(f"{url}gradio_api/call/segment", json.dumps(call).encode(),
                "application/json")["event_id"]
  with urllib.request.urlopen(f"{url}gradio_api/call/segment/{event}", timeout=600) as response:
    stream = response.read().decode()
  kind, _, rest = stream.partition("\ndata: ")
  if kind != "event: complete":
    raise RuntimeError(f"/segment failed: {stream[:500]}")
  outputs = json.loads(rest.splitlines()[0])
  for image in outputs[:3]:
    with urllib.request.urlopen(image["url"], timeout=600) as response:
      response.read()
  return outputs[3]


def _row(name: str, wall: float, latencies: list[float]) -> tuple[str, float, float, float]:
  p50, p95 = np.percentile(latencies, [50, 95]) * 1000
  return name, len(latencies) / wall, p50, p95


def main(argv: list[str]) -> None:
  del argv
  if not _CHECKPOINT.value:
    raise app.UsageError("--checkpoint is required")
  tmp = tempfile.mkdtemp(prefix="serve-benchmark-")
  inputs = _inputs(_CHECKPOINT.value, tmp)
  segmenter = inference.Segmenter.from_checkpoint(_CHECKPOINT.value, batch_size=_BATCH.value)
  images = {path: inference.read_image(path) for path, _ in inputs}
  lock = threading.Lock()

  def direct(path: str, text: str) -> None:
    with lock:
      segmenter.segment([images[path]], [text])

  process, url = _start_server(_CHECKPOINT.value, os.path.join(tmp, "server.log"))
  uploads = {}
  for path in images:
    with open(path, "rb") as f:
      uploads[path] = f.read()

  def served(path: str, text: str) -> None:
    verdict = _segment_over_http(url, uploads[path], os.path.basename(path), text)
    if verdict.startswith("Error"):
      raise RuntimeError(verdict)

  try:
    rows = []
    for clients in map(int, _CLIENTS.value):
      for name, ask in (("direct", direct), ("unires-serve", served)):
        _run(ask, inputs, clients, clients)  # warm-up: compiled programs, HTTP clients
        rows.append((clients, *_row(name, *_run(ask, inputs, clients, _REQUESTS.value))))
  finally:
    process.send_signal(signal.SIGTERM)
    process.wait(60)
  print(f"\n{_REQUESTS.value} requests per row, batch size {segmenter.batch_size}, "
        f"{segmenter.mesh.size} device(s) ({segmenter.mesh.devices.flat[0].platform}), "
        f"{os.cpu_count()} CPU cores\n")
  print(f"{'clients':>7}  {'path':<13} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8}  "
        f"{'direct/serve req/s':>18}")
  for i, (clients, name, rate, p50, p95) in enumerate(rows):
    ratio = f"{rows[i - 1][2] / rate:18.2f}" if name == "unires-serve" else ""
    print(f"{clients:>7}  {name:<13} {rate:7.2f} {p50:8.1f} {p95:8.1f}  {ratio}")


if __name__ == "__main__":
  app.run(main)
