"""What a run left besides its metrics, read back for the HTML report: per-image predictions, overlays, metadata.

Every piece is optional: runs logged before ``predictions.csv`` existed, or with ``num_images: 0``,
simply have less to show.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PREDICTIONS = "predictions.csv"
OVERLAYS = "anomaly_maps"
CURVES = "curves"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")


@dataclass
class Predictions:
    """One row per test image: its score, whether it was flagged (``label``), the truth (``target``), the defect."""

    path: list[str]
    score: np.ndarray
    label: np.ndarray
    target: np.ndarray
    defect: list[str]

    def misses(self, kind: str, count: int) -> np.ndarray:
        """Indices of the worst false accepts (defects scored lowest) or false rejects (good images scored highest)."""
        if kind == "false accept":
            found = np.flatnonzero((self.target == 1) & (self.label == 0))
            return found[np.argsort(self.score[found], kind="stable")][:count]
        found = np.flatnonzero((self.target == 0) & (self.label == 1))
        return found[np.argsort(-self.score[found], kind="stable")][:count]


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


def read_predictions(file: Path) -> Predictions:
    """Parse ``predictions.csv`` (``path,score,label,target,defect``); a missing ``label`` is left at 0."""
    with open(file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    column = lambda name, kind: np.array([kind(r[name]) if r.get(name) not in (None, "") else 0 for r in rows])
    return Predictions(path=[r.get("path", "") for r in rows], score=column("score", float).astype(float),
                       label=column("label", int), target=column("target", int),
                       defect=[r.get("defect") or ("good" if r.get("target") == "0" else "defect") for r in rows])


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
