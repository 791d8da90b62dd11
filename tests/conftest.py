"""Shared fixtures: every test writes caches and tracking stores under its own temp folders."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Generated datasets go to a temp cache, never to the developer's ~/.cache/ad."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AD_CACHE_DIR", str(tmp_path_factory.mktemp("ad_cache")))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mp.undo()
