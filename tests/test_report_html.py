"""The HTML report of a real sweep, opened in headless Chromium: no console message, every image decoded, not blank.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no
extra package), which reports console messages, CSP violations and script errors as events, and
can ask the page whether each image decoded. Needs Debian's ``chromium`` (``apt-get install -y
chromium``); skipped without it.
"""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")
WIDTH, HEIGHT = 1280, 1800
IMAGES_DECODED = "JSON.stringify([...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0]))"


class Browser:
    """Headless Chromium spoken to over the DevTools protocol on file descriptors 3 (in) and 4 (out)."""

    def __init__(self, profile: Path) -> None:
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def wire() -> None:  # in the child: the protocol's descriptors where Chromium expects them
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", "--hide-scrollbars", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._next_id, self.events = b"", 0, []

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """Run one protocol command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> None:
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self._receive())

    def open(self, page: Path) -> tuple[list[str], list, bytes]:
        """Load ``page``: its console messages (CSP violations, errors), which images decoded, a PNG screenshot."""
        target = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                  mobile=False)
        self.events.clear()
        self.send("Page.navigate", session, url=page.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        images = json.loads(self.send("Runtime.evaluate", session, expression=IMAGES_DECODED,
                                      returnByValue=True)["result"]["value"])
        shot = base64.b64decode(self.send("Page.captureScreenshot", session, format="png")["data"])
        console = [json.dumps(event["params"])[:300] for event in self.events
                   if event.get("method") in ("Runtime.consoleAPICalled", "Runtime.exceptionThrown", "Log.entryAdded")]
        return console, images, shot

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._in)
        os.close(self._out)


@pytest.fixture
def browser(tmp_path):
    chromium = Browser(tmp_path / "profile")
    yield chromium
    chromium.close()


def content(png: bytes) -> tuple[int, float]:
    """Distinct colours of a screenshot and its share of pixels that are not white."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = len(image.getcolors(maxcolors=1 << 20) or [])
    grey = image.convert("L")
    return colours, sum(grey.histogram()[:250]) / (image.width * image.height)


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@needs_chromium
def test_the_html_report_of_a_sweep_renders_in_chromium(tmp_path, browser):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run(tmp_path, "ad.launch", "-m", *TINY, "dataset.n_train=20", "dataset.n_test_good=8", "dataset.n_test_defect=8",
        "model.n_features=10,20", "dataset.category=brick,grass", f"tracking.uri={uri}", "tracking.log_model=false")
    page = tmp_path / "report.html"
    report = run(tmp_path, "ad.report", "--tracking-uri", uri, "--out", str(tmp_path), "--html", str(page))
    assert "model.n_features" in report.stdout
    console, images, shot = browser.open(page)
    assert console == []
    assert len(images) == page.read_text().count("<img ") >= 1  # the sweep plot, and more with predictions.csv
    assert all(decoded for _, decoded in images), images
    colours, inked = content(shot)
    assert colours > 200 and inked > 0.05, (colours, inked)


@needs_chromium
def test_the_browser_check_sees_an_outside_reference_and_a_broken_image(tmp_path, browser):
    """The checks above can fail: a page loading from the network under the report's policy is caught."""
    from ad.report.html import CSP

    page = tmp_path / "bad.html"
    page.write_text(f'<!doctype html><meta http-equiv="Content-Security-Policy" content="{CSP}">'
                    '<img alt="outside" src="https://example.com/x.png">'
                    '<img alt="broken" src="data:image/png;base64,AA">')
    console, images, shot = browser.open(page)
    assert any("Content Security Policy" in line for line in console), console
    assert images == [["outside", False], ["broken", False]]
    assert content(shot)[1] < 0.05  # a page with nothing to show is found blank
