"""unires-serve in a real browser: Debian's headless Chromium, driven by Selenium (no browser or
driver is downloaded). The page segments an uploaded ShapesParts image as `unires-segment` does
(the same verdict, overlay and mask, pixel for pixel), shows bad inputs as messages and keeps
serving, loads nothing from outside the server, and keeps requests only under --save_dir."""

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from absl import flags
from PIL import Image

from tests.repo import ROOT
from tests.serving.conftest import NO_TARGET_THRESHOLD

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the networking switches Chromium reaches for Google's services (a closed network here).
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1100")
MAX_PIXELS, MAX_UPLOAD_MB = 40_000, 0.1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("serving"),  # one worker trains `demo_run` (.ci/run: loadgroup)
    pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                       reason="needs Debian's chromium and chromium-driver (.ci/run installs "
                       "them)"),
]
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top,wrong-import-position
from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top,wrong-import-position


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> str:
  from tests.owlv2_files import write_tiny_detector  # pylint: disable=g-import-not-at-top

  return write_tiny_detector(str(tmp_path_factory.mktemp("owlv2") / "owlv2"))


@pytest.fixture(scope="module")
def server(demo_run, detector_dir, tmp_path_factory):
  """`unires-serve` on the demo run with the tiny detector: (URL, --save_dir, its log file)."""
  root = tmp_path_factory.mktemp("server")
  port, save_dir, log_path = _free_port(), root / "saved", root / "server.log"
  with open(log_path, "w", encoding="utf-8") as log:
    process = subprocess.Popen(
        [sys.executable, "-m", "unires_jax.cli.serve", f"--checkpoint={demo_run}",
         f"--detector={detector_dir}", "--host=127.0.0.1", f"--port={port}",
         f"--save_dir={save_dir}", "--batch_size=8", f"--max_pixels={MAX_PIXELS}",
         f"--max_upload_mb={MAX_UPLOAD_MB}", f"--no_target_threshold={NO_TARGET_THRESHOLD}"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"
  deadline = time.monotonic() + 300
  while True:
    assert process.poll() is None, log_path.read_text()[-5000:]
    assert time.monotonic() < deadline, "not serving after 300 s:\n" + log_path.read_text()[-5000:]
    try:
      with urllib.request.urlopen(url, timeout=5) as response:
        if response.status == 200:
          break
    except OSError:
      time.sleep(1)
  yield url, save_dir, log_path
  process.send_signal(signal.SIGTERM)
  assert process.wait(60) == 0, log_path.read_text()[-5000:]
  # Uploads and results lived in a private folder, removed when the server stopped.
  (private,) = re.findall(r"uploads and results live in (\S+) ", log_path.read_text())
  assert not os.path.exists(private)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in CHROMIUM_ARGS:
    options.add_argument(arg)
  options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
  # Both paths given: Selenium Manager has nothing to find (SE_OFFLINE: nor may it download).
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


class _Page:
  """The demo page in the browser, by the elements' ids (serving/app.py)."""

  def __init__(self, driver, url: str):
    self.driver, self.url = driver, url
    driver.get(url)
    self.wait = WebDriverWait(driver, 120)
    self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))

  def value(self, elem_id: str) -> str:
    return self.driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute("value")

  def upload(self, path: str) -> None:
    for clear in self.driver.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear']"):
      self.driver.execute_script("arguments[0].click()", clear)  # under a refused upload's box
    self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    self.driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(path)

  def uploaded(self, name: str) -> None:
    stem, ext = os.path.splitext(name)  # the page shows "stem\n.ext"
    self.wait.until(lambda d: f"{stem}\n{ext}" in d.find_element(By.ID, "upload").text)

  def type(self, elem_id: str, text: str) -> None:
    box = self.driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea")
    box.clear()
    box.send_keys(text)

  def segment(self) -> tuple[str, str]:
    """Clicks Segment; (verdict, details) once they change."""
    before = (self.value("verdict"), self.value("details"))
    self.driver.find_element(By.ID, "segment").click()
    self.wait.until(lambda _: (self.value("verdict"), self.value("details")) != before)
    return self.value("verdict"), self.value("details")

  def image(self, elem_id: str) -> np.ndarray:
    src = self.driver.find_element(By.CSS_SELECTOR, f"#{elem_id} img").get_attribute("src")
    assert src.startswith(self.url), src  # served by the demo, as a PNG (lossless)
    with urllib.request.urlopen(src, timeout=30) as response:
      return np.asarray(Image.open(io.BytesIO(response.read())))


def _segment_cli(*args: str) -> int:
  """`unires-segment ARGS` in this process (as tests/test_segment.py runs it)."""
  from unires_jax.cli import segment as segment_cli  # pylint: disable=g-import-not-at-top

  flags.FLAGS.unparse_flags()
  flags.FLAGS(["unires-segment", *args])
  return segment_cli.main(["unires-segment"])


def test_the_page_segments_as_unires_segment_does(server, browser, demo_run, detector_dir,
                                                  tmp_path, capsys):
  url, save_dir, _ = server
  page = _Page(browser, url)
  outside = browser.execute_script(
      "return performance.getEntriesByType('resource').map(e => e.name)"
      ".filter(n => !n.startsWith(arguments[0]))", url)
  assert not outside, f"the page loads from elsewhere: {outside}"
  (private,) = re.findall(r"uploads and results live in (\S+) ", server[2].read_text())
  if os.path.isdir("/dev/shm"):
    assert private.startswith("/dev/shm/"), private  # in memory, not on disk

  with open(os.path.join(demo_run, "raw", "annotations", "val.json"), encoding="utf-8") as f:
    reference = json.load(f)[0]
  image = shutil.copy(os.path.join(demo_run, "raw", "images", reference["img_name"]),
                      tmp_path / "scene.jpg")
  text = reference["sentences"][0]["sent"]
  page.upload(str(image))
  page.uploaded("scene.jpg")
  page.type("text", text)
  verdict, details = page.segment()
  browser.save_screenshot(str(tmp_path / "page.png"))
  assert re.fullmatch(r"target \(no-target p=0\.\d\d\), mask \d+\.\d% of the image", verdict), verdict
  src = browser.find_element(By.CSS_SELECTOR, "#overlay img").get_attribute("src")
  assert f"file={private}/" in src, src
  assert details.startswith("proposals: 6 object boxes, 16 part boxes (found by the detector) · "
                            "model "), details

  out = tmp_path / "cli" / "mask.png"
  assert _segment_cli(f"--checkpoint={demo_run}", f"--image={image}", f"--text={text}",
                      f"--out={out}", f"--detector={detector_dir}",
                      f"--no_target_threshold={NO_TARGET_THRESHOLD}") == 0
  line = capsys.readouterr().out.strip()
  assert line == (f'{image} "{text}": {verdict} -> {out}; proposals from the detector'), line
  np.testing.assert_array_equal(page.image("overlay"),
                                np.asarray(Image.open(tmp_path / "cli" / "mask_overlay.png")))
  np.testing.assert_array_equal(page.image("mask"), np.asarray(Image.open(out)))
  proposals = page.image("proposals")
  assert proposals.shape == (128, 128, 3)
  assert (proposals != np.asarray(Image.open(image))).any()  # the boxes are drawn

  (saved,) = os.listdir(save_dir)  # --save_dir: the request, whole
  assert f"saved as {saved}" in details
  assert sorted(os.listdir(save_dir / saved)) == ["input.jpg", "mask.png", "mask_overlay.png",
                                                  "request.json"]
  assert (save_dir / saved / "input.jpg").read_bytes() == image.read_bytes()


def test_bad_inputs_show_a_message_and_the_next_request_works(server, browser, demo_run,
                                                              tmp_path):
  url, save_dir, log_path = server
  page = _Page(browser, url)
  (tmp_path / "broken.png").write_bytes(b"not an image at all")
  Image.fromarray(np.full((250, 200, 3), 90, np.uint8)).save(tmp_path / "large.png")
  noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
  Image.fromarray(noise).save(tmp_path / "heavy.png")  # 197 kB, over --max_upload_mb
  saved_before = len(os.listdir(save_dir)) if os.path.isdir(save_dir) else 0

  page.upload(str(tmp_path / "broken.png"))
  page.uploaded("broken.png")
  page.type("text", "the red truck")
  verdict, details = page.segment()
  assert verdict == "Error: broken.png is not an image this server can read (PNG, JPEG, ...)"
  assert not details and not browser.find_elements(By.CSS_SELECTOR, "#overlay img")

  page.upload(str(tmp_path / "large.png"))
  page.uploaded("large.png")
  assert page.segment()[0] == (f"Error: large.png has 200 x 250 pixels; this server takes at "
                               f"most {MAX_PIXELS} (--max_pixels)")

  page.upload(str(tmp_path / "heavy.png"))  # refused by Gradio at the upload, in the page
  page.wait.until(lambda d: "exceed the maximum allowed size" in d.find_element(
      By.TAG_NAME, "body").text)

  page.upload(os.path.join(demo_run, "raw", "images", "shapes_parts_10000002.jpg"))
  page.uploaded("shapes_parts_10000002.jpg")
  page.type("text", " ")
  assert page.segment()[0] == "Error: type an expression (what to segment)"

  # One of the demo's held-out images, with boxes given: it still works.
  browser.find_element(By.XPATH, "//td[contains(., 'shapes_parts_10000003.jpg')]").click()
  page.wait.until(lambda _: page.value("text") == "the green person legs")
  page.type("boxes", '{"object": [[10, 10, 100, 100]], "part": [[20, 20, 40, 60]]}')
  verdict, details = page.segment()
  browser.save_screenshot(str(tmp_path / "after_errors.png"))
  assert verdict.startswith("target (no-target p="), verdict
  assert details.startswith("proposals: 1 object box, 1 part box (given with the request)")
  assert page.image("overlay").shape == (128, 128, 3)
  assert len(os.listdir(save_dir)) == saved_before + 1  # only the request that was served
  assert "Traceback" not in log_path.read_text()

