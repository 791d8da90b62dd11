"""A busy machine slows a run by its fair share of the CPUs, never stalls it.

The run must not wait on work of its own that ordinary load can starve: a helper thread at lowered
priority that the run waits for at its end ran only when the cores fell idle, so three CPU-bound
processes kept a tracked run from finishing at all. The load here is as many CPU-bound processes as
cores, plus one, at normal priority and in this test's own session: the kernel groups a session's
processes for scheduling, so the run and the load share one group, as in a user's terminal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import TINY, busy

#: How much slower than idle a busy machine may make the whole command: a fair share of the cores
#: (the run's threads against cores + 1 busy processes) costs about 2-2.5x.
SLOWDOWN_LIMIT = 3.0
#: Where other sessions keep the machine busy too, the same load slows every process of this
#: session more than that; the run may then be this much slower than a plain CPU-bound process.
FAIR_SHARE_MARGIN = 1.5
#: One CPU-bound process: spins until its deadline (argv[1], seconds) even if the test never stops it.
#: A fixed amount of plain single-threaded CPU work: what the load does to any process of this session.
REFERENCE = "for _ in range(30_000_000):\n    pass\n"
SMALL = [*TINY, "dataset.n_train=12", "dataset.n_test_good=6", "dataset.n_test_defect=6"]


def timed_launch(tmp_path: Path, name: str, overrides: list[str], migrated_db: Path, timeout: float) -> float:
    """Wall seconds of one cold ``python -m ad.launch`` (own cache, own copy of a migrated MLflow store).

    Fails the test when the command runs past ``timeout`` or fails.
    """
    work = tmp_path / name
    work.mkdir()
    shutil.copy(migrated_db, work / "mlflow.db")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AD_CACHE_DIR": str(work / "cache")}
    command = [sys.executable, "-m", "ad.launch", *overrides, f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    start = time.perf_counter()
    try:  # in this session, beside the load (no start_new_session)
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: still running after {timeout:.0f} s (its idle run, times the allowed slowdown)")
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    return wall


def reference_seconds() -> float:
    """Wall seconds of a fixed piece of plain CPU work in a fresh process of this session."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", REFERENCE], check=True, timeout=600)
    return time.perf_counter() - start


def assert_busy_run_keeps_up(tmp_path: Path, overrides: list[str], migrated_db: Path) -> None:
    """The command idle, then under load: at most ``SLOWDOWN_LIMIT`` times slower, or, on a machine that
    other sessions keep busy, at most ``FAIR_SHARE_MARGIN`` times the slowdown of plain CPU work.

    A run that waits on starved work of its own is stalled for as long as the load lasts: it fails either way.
    """
    reference_idle = reference_seconds()
    idle = timed_launch(tmp_path, "idle", overrides, migrated_db, timeout=600)
    with busy(600):
        fair_share = reference_seconds() / reference_idle
        ratio = max(SLOWDOWN_LIMIT, FAIR_SHARE_MARGIN * fair_share)
        loaded = timed_launch(tmp_path, "loaded", overrides, migrated_db, timeout=ratio * idle)
    print(f"idle {idle:.1f} s, busy {loaded:.1f} s ({loaded / idle:.2f}x); plain CPU work {fair_share:.2f}x slower")
    assert loaded <= ratio * idle, f"idle {idle:.1f} s, busy {loaded:.1f} s; plain CPU work {fair_share:.1f}x slower"


@pytest.mark.slow
def test_a_tracked_run_on_a_busy_machine_takes_at_most_3x_its_idle_time(tmp_path, migrated_db):
    # default tracking: MLflow with the model and the anomaly-map panels, the work that used to starve
    assert_busy_run_keeps_up(tmp_path, ["model=padim", *SMALL], migrated_db)


@pytest.mark.slow
def test_a_parallel_sweep_on_a_busy_machine_takes_at_most_3x_its_idle_time(tmp_path, migrated_db):
    overrides = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=padim", *SMALL,
                 "dataset.category=brick,grass"]
    assert_busy_run_keeps_up(tmp_path, overrides, migrated_db)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are a Unix call")
def test_nothing_the_run_waits_on_runs_at_a_lowered_priority(tmp_path):
    """The tracker's and the cache writer's threads run at the caller's priority (an unprivileged
    process could never raise a lowered one again before waiting on it)."""
    import torch

    from ad.cache import DiskCache
    from ad.tracking import BackgroundTracker, NullTracker

    def own_priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    tracker = BackgroundTracker(NullTracker())
    cache = DiskCache(tmp_path)
    cache.save_async("features", "ab01", torch.ones(2))  # starts the writer thread
    try:
        assert tracker._pool.submit(own_priority).result() == own_priority()
        assert cache._writer.submit(own_priority).result() == own_priority()
    finally:
        tracker.end()
        cache.flush()


def test_only_the_first_job_of_the_command_counts_from_its_start(monkeypatch):
    import ad.launch

    assert ad.launch.process_started() <= time.perf_counter()
    monkeypatch.setattr(ad.launch, "_command_started", (os.getpid(), 12.5))
    assert ad.launch.claim_command_start() == 12.5
    assert ad.launch.claim_command_start() is None  # later jobs count from their own start
    monkeypatch.setattr(ad.launch, "_command_started", (os.getpid() + 1, 12.5))  # pickled into a worker process
    assert ad.launch.claim_command_start() is None
