"""The run's model bundle as an MLflow model: loaded by ``mlflow.pyfunc`` and served over HTTP by MLflow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import TINY, compose_config

from ad.data.io import read_image
from ad.predictions import read_predictions
from ad.run import run
from ad.serving import log_bundle, requirements


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[str, Path, str]:
    """A tiny PaDiM run, its bundle logged to a fresh SQLite store: (model URI, run folder, tracking URI)."""
    root = tmp_path_factory.mktemp("serving")
    run_dir = root / "run"
    run(compose_config(*TINY, "tracking=none", "dataset.n_train=10", "dataset.n_test_good=3",
                       "dataset.n_test_defect=3"), run_dir)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("serving")
    run_id = client.create_run(experiment).info.run_id
    info = log_bundle(run_dir / "model", "padim-resnet18-brick", run_id, uri=uri)
    return info.model_uri, run_dir, uri


def test_pyfunc_scores_paths_dataframes_and_image_batches_as_the_run_did(logged):
    model_uri, run_dir, uri = logged
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    rows = read_predictions(run_dir / "predictions.csv")
    paths = [row["path"] for row in rows]
    expected = np.array([float(row["score"]) for row in rows])
    by_path = model.predict(paths)
    assert list(by_path.columns) == ["score", "label"] and len(by_path) == len(rows)
    np.testing.assert_allclose(by_path["score"], expected, rtol=1e-5)
    assert by_path["label"].tolist() == [int(row["label"]) for row in rows]
    np.testing.assert_allclose(model.predict(pd.DataFrame({"path": paths}))["score"], expected, rtol=1e-5)
    size = json.loads((run_dir / "model" / "bundle.json").read_text())["preprocessing"]["image_size"]
    batch = np.stack([read_image(path, size) for path in paths])
    np.testing.assert_allclose(model.predict(batch)["score"], expected, rtol=1e-5)


def test_logged_model_lists_what_installs_it_elsewhere():
    names = {line.split("==")[0] for line in requirements()}
    assert {"torch", "torchvision", "timm", "safetensors", "numpy", "pillow"} <= names
    assert "hydra-core" not in names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_real_request(logged):
    model_uri, run_dir, uri = logged
    port = free_port()
    # MLflow starts uvicorn by name: the environment's scripts must be on PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        rows = read_predictions(run_dir / "predictions.csv")[:2]
        body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [[row["path"]] for row in rows]}})
        deadline, answer = time.monotonic() + 120, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                                 {"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
            except OSError:
                time.sleep(1)
        assert answer is not None, server.stdout.read().decode()[-2000:] if server.poll() is not None else "timeout"
        scores = [prediction["score"] for prediction in answer["predictions"]]
        np.testing.assert_allclose(scores, [float(row["score"]) for row in rows], rtol=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_logging_a_bundle_leaves_the_callers_store_as_it_was(logged, tmp_path, monkeypatch):
    """The store is set for the call only: MLflow exports it to the environment, and child processes read that."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    model_uri, run_dir, uri = logged
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name("serving").experiment_id).info.run_id
    log_bundle(run_dir / "model", "again", run_id, uri=uri)
    assert "MLFLOW_TRACKING_URI" not in os.environ
