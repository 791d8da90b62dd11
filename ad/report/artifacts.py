"""What a run left besides its metrics, read back for the HTML report: per-image predictions, overlays, metadata.

Every piece is optional: runs logged before ``predictions.csv`` existed, or with ``num_images: 0``,
simply have less to show.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PREDICTIONS = "predictions.csv"
OVERLAYS = "anomaly_maps"
CURVES = "curves"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")


@dataclass
class Predictions:
    """One row per test image: its score, the truth (``target``: 1 defective), the defect, whether it was flagged."""

    path: list[str]
    score: np.ndarray
    target: np.ndarray
    defect: list[str]
    label: np.ndarray | None = None  # 1 = flagged anomalous at the run's threshold; None without a threshold

    def flagged(self, threshold: float | None) -> np.ndarray | None:
        """Which images the run flagged: its labels, else the scores at ``threshold``, else None."""
        if self.label is not None:
            return self.label.astype(bool)
        return None if threshold is None else self.score >= threshold

    def misses(self, flagged: np.ndarray) -> dict[str, np.ndarray]:
        """Indices of the false accepts (defective, not flagged; lowest score first) and false rejects
        (good, flagged; highest score first): the worst misses lead."""
        accepts = np.flatnonzero((self.target == 1) & ~flagged)
        rejects = np.flatnonzero((self.target == 0) & flagged)
        return {"false accept": accepts[np.argsort(self.score[accepts], kind="stable")],
                "false reject": rejects[np.argsort(-self.score[rejects], kind="stable")]}


@dataclass
class RunArtifacts:
    """The files of one run the report shows, downloaded to a scratch folder."""

    predictions: Predictions | None = None
    info: dict = field(default_factory=dict)  # metrics.json: weights, precision, device, versions...
    overlays: dict[str, Path | None] = field(default_factory=dict)  # name -> local file, fetched on demand
    curves: list[Path] = field(default_factory=list)  # curve images the run logged itself (PRO needs maps)
    download: Callable[[str], Path] | None = None  # artifact path -> local file

    def overlay(self, defect: str, path: str) -> Path | None:
        """The overlay panel logged for a test image (``anomaly_maps/NNN_<defect>_<stem>.png``), if one was."""
        suffix = f"_{defect}_{Path(path).stem}.png"
        for name in self.overlays:
            if name.endswith(suffix):
                if self.overlays[name] is None:
                    self.overlays[name] = self.download(f"{OVERLAYS}/{name}")
                return self.overlays[name]
        return None


def read_predictions(file: Path) -> Predictions | None:
    """Parse ``predictions.csv`` (``path,score,label,target,defect``); None when it has no ground truth to compare."""
    with open(file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "score" not in rows[0] or "target" not in rows[0]:
        return None
    labels = [r.get("label") or "" for r in rows]
    return Predictions(path=[r.get("path", "") for r in rows], score=np.array([float(r["score"]) for r in rows]),
                       target=np.array([int(r["target"]) for r in rows]),
                       defect=[r.get("defect") or ("good" if r["target"] == "0" else "defect") for r in rows],
                       label=None if "" in labels else np.array(labels, dtype=int))


@contextlib.contextmanager
def quiet_downloads() -> Iterator[None]:
    """Without MLflow's progress bar per downloaded file (one line each on the terminal), restored after."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def fetch(client, run_id: str, scratch: Path) -> RunArtifacts:
    """List a run's artifacts and download what the report shows now; overlays wait until a miss needs one."""
    folder = scratch / run_id
    download = lambda path: Path(client.download_artifacts(run_id, path, str(folder)))
    names = {Path(f.path).name: f for f in client.list_artifacts(run_id)}
    found = RunArtifacts(download=download)
    if PREDICTIONS in names:
        found.predictions = read_predictions(download(PREDICTIONS))
    if "metrics.json" in names:
        found.info = json.loads(download("metrics.json").read_text())
    if OVERLAYS in names and names[OVERLAYS].is_dir:
        found.overlays = {Path(f.path).name: None for f in client.list_artifacts(run_id, OVERLAYS)}
    if CURVES in names and names[CURVES].is_dir:
        found.curves = [download(f.path) for f in client.list_artifacts(run_id, CURVES)
                        if f.path.lower().endswith(IMAGE_SUFFIXES)]
    return found
