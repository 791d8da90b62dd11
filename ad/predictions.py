"""Per-image results as a CSV table: what a run scored on its test split, and what ``ad.predict`` flags.

One row per image, in input order: ``path``, ``score`` and ``label`` (1 = anomalous at the image
threshold, 0 = normal, empty without a threshold), then ``target`` and ``defect`` (the ground truth,
for a run's test split) or ``anomalous_area`` (the share of pixels at or above the pixel threshold,
for ``ad.predict`` with a map method).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FILE = "predictions.csv"


def labels_at(scores: np.ndarray, threshold: float | None) -> list[int | str]:
    """1 where a score reaches the threshold, else 0; empty cells without a threshold."""
    if threshold is None:
        return [""] * len(scores)
    return [int(flag) for flag in np.asarray(scores, dtype=np.float64) >= threshold]


def write_predictions(path: Path, columns: dict[str, Sequence]) -> Path:
    """Write ``columns`` (equal-length sequences, in column order) atomically; scores keep full float32 precision."""
    names = list(columns)
    length = {len(values) for values in columns.values()}
    if len(length) > 1:
        raise ValueError(f"columns differ in length: { {name: len(columns[name]) for name in names} }")
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(names)
        for row in zip(*(columns[name] for name in names), strict=True):
            writer.writerow([f"{value:.9g}" if isinstance(value, float) else value for value in row])
    os.replace(tmp, path)
    return path


def write_test_predictions(path: Path, samples: Sequence, scores: np.ndarray, threshold: float | None) -> Path:
    """A run's table: every test image's score, its label at the operating threshold and its ground truth."""
    return write_predictions(path, {
        "path": [str(sample.image) for sample in samples],
        "score": np.asarray(scores).tolist(),
        "label": labels_at(scores, threshold),
        "target": [sample.label for sample in samples],
        "defect": [sample.defect for sample in samples],
    })


def read_predictions(path: Path) -> list[dict[str, str]]:
    """The rows of a predictions table as dicts of strings."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))
