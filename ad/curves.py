"""Image-level ROC and precision-recall curves from value sorts, in NumPy alone.

An image is flagged iff its score >= the threshold, and every distinct score is a threshold.
``ad.metrics`` picks the F1-best threshold from these counts; the report draws the curves, and
without torch, which is why this module needs nothing but NumPy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["flagged_counts", "precision_recall_curve", "roc_curve"]


def flagged_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct score (ascending, float64) and how many defective (tp) and good (fp) images score >= it.

    ``scores`` (N,) are raw scores, ``labels`` (N,) 1 for defective and 0 for good images.
    """
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    thresholds = np.unique(scores)
    defective, good = np.sort(scores[labels]), np.sort(scores[~labels])
    tp = len(defective) - np.searchsorted(defective, thresholds, "left")
    fp = len(good) - np.searchsorted(good, thresholds, "left")
    return thresholds, tp, fp


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates from (0, 0) through every threshold, highest first; both classes needed."""
    _, tp, fp = flagged_counts(scores, labels)
    return np.append(0.0, fp[::-1] / fp[0]), np.append(0.0, tp[::-1] / tp[0])  # the lowest threshold flags all


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall from (1, 0) through every threshold, highest first; defective images needed."""
    _, tp, fp = flagged_counts(scores, labels)
    return np.append(1.0, (tp / (tp + fp))[::-1]), np.append(0.0, tp[::-1] / tp[0])
