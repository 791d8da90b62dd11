"""Operating thresholds: the score at and above which an image (or a pixel) is flagged anomalous.

They are set on the validation split, never on the test split, so the test metrics at the operating
point stay honest. The default needs good images only: the threshold is an order statistic of the
held-out good scores chosen so that at most a target share of good images is rejected, and a
one-sided 95% bound says how far that holds at the sample size (few good images, loose bound).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ad.errors import ADError

#: How thresholds can be set (``threshold.method``).
METHODS = ("false_reject_rate", "f1", "manual", "none")
#: Confidence of the reported upper bound on the false-reject rate.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Threshold:
    """A threshold (flag when score >= ``value``) and how it was set."""

    value: float
    method: str
    n_calibration: int = 0  # good scores it was set on (images, or pixels)
    target_false_reject_rate: float | None = None
    false_reject_rate_bound: float | None = None  # true rate <= this with CONFIDENCE (exchangeable images)
    lowest: float | None = None  # the lowest calibration score: the floor of a heat map's colour scale

    def to_dict(self) -> dict:
        return asdict(self)


def just_above(value: float) -> float:
    """The next float32 above ``value``: a threshold that lets exactly ``value`` pass as normal."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def from_false_reject_rate(good_scores: np.ndarray, rate: float) -> Threshold:
    """Threshold just above the k-th smallest of n good scores, k = ceil((n + 1)(1 - rate)), capped at n.

    For a new good image exchangeable with the calibration ones, P(rejected) <= (n + 1 - k) / (n + 1)
    <= ``rate`` (the conformal guarantee); below n = 1/rate - 1 images the rate cannot be reached and the
    largest score is used. The true rate at that order statistic is Beta(n + 1 - k, k) distributed, whose
    95% quantile is the reported bound.

    Args:
        good_scores: (N,) scores of held-out good images (or pixels).
        rate: target false-reject rate in (0, 1).
    """
    scores = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())
    if not 0.0 < rate < 1.0:
        raise ADError(f"threshold.false_reject_rate: must be in (0, 1), got {rate!r}")
    n = len(scores)
    if n == 0:
        raise ADError("threshold: no good validation images to set it on; set dataset.val_ratio > 0 "
                      "(or threshold.method=manual with threshold.value, or none)")
    if not np.isfinite(scores).all():
        raise ADError("threshold: validation scores contain NaN or inf; the model produced invalid values")
    k = order_statistic_rank(n, rate)
    return Threshold(just_above(scores[k - 1]), "false_reject_rate", n, rate, false_reject_rate_bound(n, k))


def order_statistic_rank(n: int, rate: float) -> int:
    """The rank k (1-based) of the smallest order statistic of n good scores keeping P(reject) <= ``rate``."""
    return min(n, math.ceil((n + 1) * (1.0 - rate)))


def from_f1(scores: np.ndarray, labels: np.ndarray) -> Threshold:
    """The threshold with the best F1 on labelled validation scores (anomalous iff score >= threshold)."""
    import torch

    from ad.metrics import image_f1_max

    _, value = image_f1_max(torch.as_tensor(np.asarray(scores)), torch.as_tensor(np.asarray(labels)))
    return Threshold(float(value), "f1", int(np.sum(np.asarray(labels) == 0)))


def false_reject_rate_bound(n: int, k: int) -> float:
    """95% upper bound on the false-reject rate of a threshold just above the k-th smallest of n good scores."""
    from scipy.special import betaincinv  # not scipy.stats, a second of start-up

    return float(betaincinv(n + 1 - k, k, CONFIDENCE))  # the Beta(n + 1 - k, k) quantile


def calibrate(settings, scores: np.ndarray | None, labels: np.ndarray | None) -> Threshold | None:
    """The image threshold ``settings`` (the ``threshold`` config node) asks for, from validation scores.

    Returns None for ``method=none``. ``scores``/``labels`` are the validation split's (N,) arrays
    (None when there is no validation split).
    """
    method = settings.get("method", "false_reject_rate")
    if method == "none":
        return None
    if method == "manual":
        return Threshold(float(settings.value), "manual")
    if scores is None or len(scores) == 0:
        raise ADError(f"threshold.method={method}: the validation split is empty; set dataset.val_ratio > 0, "
                      f"or threshold.method=manual with threshold.value")
    labels = np.zeros(len(scores), dtype=np.int64) if labels is None else np.asarray(labels)
    if method == "f1":
        if not (labels == 1).any() or not (labels == 0).any():
            raise ADError("threshold.method=f1: needs good and defective validation images; "
                          "dataset=folder: set dataset.abnormal_val_dir, or use threshold.method=false_reject_rate")
        return from_f1(scores, labels)
    if method == "false_reject_rate":
        return from_false_reject_rate(np.asarray(scores)[labels == 0], float(settings.false_reject_rate))
    raise ADError(f"threshold.method: '{method}' is not one of {', '.join(METHODS)}")


def calibrate_pixels(settings, good_maps: np.ndarray | None) -> Threshold | None:
    """The pixel threshold: the same order statistic over every pixel of the good validation images' maps.

    Pixels of one image are not independent, so no bound is reported for it; ``manual`` takes
    ``threshold.pixel_value``.
    """
    method = settings.get("method", "false_reject_rate")
    if method == "none":
        return None
    if method == "manual":
        value = settings.get("pixel_value")
        return None if value is None else Threshold(float(value), "manual")
    if good_maps is None or good_maps.size == 0:
        return None
    rate = float(settings.get("pixel_false_reject_rate") or settings.false_reject_rate)
    if not 0.0 < rate < 1.0:
        raise ADError(f"threshold.pixel_false_reject_rate: must be in (0, 1), got {rate!r}")
    pixels = np.asarray(good_maps, dtype=np.float32).ravel()
    n = len(pixels)
    k = order_statistic_rank(n, rate)
    value = np.partition(pixels, k - 1)[k - 1]  # one partial sort: millions of pixels
    return Threshold(just_above(value), "false_reject_rate", n, rate, None, float(pixels.min()))
