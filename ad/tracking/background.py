"""A tracker that runs another tracker's calls in order on one background thread, so tracking overlaps the work."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ad.tracking.base import Tracker

if TYPE_CHECKING:
    import numpy as np
    from omegaconf import DictConfig


class BackgroundTracker(Tracker):
    """Runs another tracker's calls in order on one background thread, so tracking overlaps the work.

    Opening MLflow's store (imports, schema check) and logging a model cost seconds of Python that
    need not hold up fitting and scoring. The thread runs at the run's own priority: the run waits
    for it at its end, and a thread at lowered priority would then stall the run for as long as
    ordinary load keeps the cores busy (see ``ad.runtime.priority``). Calls return at once; a failed call
    is re-raised on the next call or by :meth:`wait`, and :meth:`end` waits for everything queued.
    The run's start time is taken when :meth:`start` is called, not when the thread gets to it.
    """

    def __init__(self, inner: Tracker) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.inner = inner
        self.num_images = inner.num_images
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracker")
        self._pending: list = []

    @property
    def run_id(self) -> str | None:
        """The wrapped tracker's run id, once its start has gone through."""
        self.wait()
        return self.inner.run_id

    @property
    def save_model(self) -> bool:
        return self.inner.save_model

    def _submit(self, method: str, *args, **kwargs) -> None:
        self._submit_call(getattr(self.inner, method), *args, **kwargs)

    def _submit_call(self, call, *args, **kwargs) -> None:
        self._raise_failures(block=False)
        self._pending.append(self._pool.submit(call, *args, **kwargs))

    def _raise_failures(self, block: bool) -> None:
        """Re-raise the first failed call (waiting for all of them when ``block``)."""
        if block:
            for future in self._pending:
                future.exception()
        for future in self._pending:
            if future.done() and future.exception() is not None:
                self._pending = []
                raise future.exception()
        self._pending = [future for future in self._pending if not future.done()]

    def wait(self) -> None:
        """Block until every queued call has run; re-raise the first one that failed."""
        self._raise_failures(block=True)

    def start(self, cfg: DictConfig, run_dir: Path, run_name: str, tags: dict[str, str],
              resume_run_id: str | None = None, start_time: float | None = None) -> None:
        mlflow = sys.modules.get("mlflow")  # a caller's active run lives on the caller's thread
        active = mlflow.active_run() if mlflow is not None else None
        if active is not None and hasattr(self.inner, "parent_run_id"):
            self.inner.parent_run_id = active.info.run_id
        self._submit("start", cfg, run_dir, run_name, tags, resume_run_id=resume_run_id,
                     start_time=time.time() if start_time is None else start_time)
        self._submit("prepare")

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit("set_tags", dict(tags))

    def log_params(self, params: dict[str, Any]) -> None:
        self._submit("log_params", dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._submit("log_metrics", dict(metrics), step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._submit("log_artifact", path, artifact_path)

    def log_image(self, image: np.ndarray, name: str) -> None:
        self._submit("log_image", image, name)

    def log_curves(self, predictions: Path, threshold: float | None) -> None:
        self._submit("log_curves", predictions, threshold)

    def log_model(self, bundle: Path, name: str | None = None) -> None:
        """Log the bundle folder on the worker (it is written whole before this is called)."""
        if not self.inner.save_model:
            return
        self._submit_call(lambda: self.inner.log_model(bundle, name))

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Finish whatever is queued, then end the run; a queued failure turns FINISHED into FAILED."""
        for future in self._pending:
            failure = future.exception()
            if failure is not None and status == "FINISHED":
                status, error = "FAILED", f"{type(failure).__name__}: {failure}"
        self._pending = []
        self._pool.submit(self.inner.end, status, error).result()
        self._pool.shutdown(wait=True)

    def links(self) -> dict[str, str]:
        """The wrapped tracker's links, once its queued calls have run."""
        self.wait()
        return self.inner.links()
