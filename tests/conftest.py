"""Shared fixtures: every test writes caches and tracking stores under its own temp folders."""

import os
import shutil
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Generated datasets go to a temp cache, never to the developer's ~/.cache/ad."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AD_CACHE_DIR", str(tmp_path_factory.mktemp("ad_cache")))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _mlflow_store_restored():
    """MLflow's current store, and the MLFLOW_TRACKING_URI it exports to child processes, as before each test:
    ``mlflow.set_tracking_uri`` in one test would otherwise send later tests' subprocesses to its store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(before)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """Create and migrate one SQLite MLflow DB per session (Alembic takes seconds per new DB)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tracking_uri(migrated_db, tmp_path) -> str:
    """The URI of a fresh copy of the migrated DB in this test's folder."""
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: OpenMP's fork/join on a shared 2-core machine costs more than the work.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """``fitted(method)``: the folder of one tiny fitted run of ``method``, made once per session and shared
    (tests read it; those that change a bundle copy it first)."""
    from helpers import FIT_TINY, QUICK, compose_config

    from ad.run import run

    runs: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in runs:
            run_dir = tmp_path_factory.mktemp(method) / "run"
            run(compose_config(*FIT_TINY, f"model={method}", *QUICK[method]), run_dir)
            runs[method] = run_dir
        return runs[method]

    return get
