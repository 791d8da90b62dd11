"""MLflow's web UI, in a real browser, opens ad's experiment on the runs table with the metric columns.

Starts ``mlflow server`` on 127.0.0.1 over a temporary SQLite store holding one tracked run, loads
the link a run ends with in headless Chromium (Debian's ``chromium``), and reads the rendered page
and a screenshot. Slow (a server and a browser): ``pytest -m slow tests/test_mlflow_ui.py``.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RUN_NAME = "padim-synthetic-brick n_features=50"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tracked_store(tmp_path) -> tuple[str, str]:
    """A SQLite store holding one finished run tracked as ad tracks it; returns its URI and experiment id."""
    from omegaconf import OmegaConf

    from ad.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri=uri, log_model=False)
    cfg = OmegaConf.create({"model": {"n_features": 50}, "dataset": {"category": "brick"}})
    tracker.start(cfg, tmp_path / "run", RUN_NAME, {"ad.model": "padim"}, start_time=time.time() - 5)
    tracker.log_metrics({"image_AUROC": 0.9123, "image_F1": 0.8649, "pixel_AUROC": 0.9252,
                         "pixel_AUPRO": 0.88, "total_s": 5.0})
    tracker.end()
    return uri, tracker.links()["experiment_url"].split("/#/experiments/")[1].split("/")[0]


@pytest.fixture
def server(tracked_store, tmp_path):
    """``mlflow server`` over the store, on a free local port; yields its address."""
    uri, _ = tracked_store
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{address}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def browse(url: str, profile: Path, *action: str) -> subprocess.CompletedProcess:
    """Headless Chromium, a fresh profile (no remembered UI choices), given time for the page's requests."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
         f"--user-data-dir={profile}", "--virtual-time-budget=20000", *action, url],
        capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(profile)})


def visible_text(html: str) -> str:
    import re

    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to render the page (apt-get install -y chromium)")
def test_the_link_opens_the_runs_table_with_the_metrics(server, tracked_store, tmp_path):
    from ad.tracking import experiment_url

    _, experiment_id = tracked_store
    url = experiment_url(server, experiment_id)
    page = browse(url, tmp_path / "profile-dom", "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    text = visible_text(page.stdout)
    assert "Runs - Experiment" in text  # the page's title: the runs view, not the GenAI overview
    assert RUN_NAME in text
    for metric, value in (("image_AUROC", "0.9123"), ("pixel_AUPRO", "0.88"), ("total_s", "5")):
        assert metric in text and value in text, f"{metric} column missing: {text[:2000]}"
    assert "Token Usage" not in text and "Traces 0" not in text  # panels of the GenAI overview

    shot = tmp_path / "runs.png"
    taken = browse(url, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1000, 1600)
    dark = pixels < 128  # text and lines on MLflow's light page
    assert 0.005 < dark.mean() < 0.5 and pixels.std() > 10, "the screenshot is blank"
