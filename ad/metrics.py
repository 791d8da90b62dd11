"""Anomaly detection metrics on raw, unbounded scores: image AUROC / F1-max, pixel AUROC / AUPRO.

Scores and maps are whatever the model outputs (e.g. Mahalanobis distances in 0..1000); no
normalisation is needed by the caller. Higher means more anomalous. Everything runs on the CPU.

All of them are written here with value-only numpy sorts in float64 on the raw scores (no scaling,
so scores far apart or one ulp apart keep their order). For the pixel metrics the sort of the
normal pixels, most of their cost, is done once for both and split over the cores. The tests check
every metric against scikit-learn and AUPRO against a brute-force reference.
"""

from __future__ import annotations

import numpy as np
import torch

from ad.curves import flagged_counts
from ad.errors import ADError
from ad.threads import map_on_cores

__all__ = [
    "compute_metrics", "image_auroc", "image_f1_max", "operating_point_metrics", "pixel_aupro", "pixel_auroc",
]

# 8-connectivity inside each image and none across the stacked image axis, so a single
# ndimage.label call over (N, H, W) gives every region of every image its own label.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def _image_inputs(scores: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and check image scores and 0/1 labels; both classes must be present.

    Returns the scores as float64 (exact for every float32, float16 and bfloat16 score) and the labels as bool.
    """
    scores = torch.as_tensor(scores).detach().cpu().flatten()
    labels = torch.as_tensor(labels).detach().cpu().flatten()
    if scores.numel() != labels.numel():
        raise ValueError(f"scores ({scores.numel()}) and labels ({labels.numel()}) differ in length")
    if not torch.isfinite(scores).all():
        raise ADError("anomaly scores contain NaN or inf; the model produced invalid values, check its fit")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 (good) or 1 (anomalous)")
    labels = labels.bool()
    if labels.all() or not labels.any():
        only = "anomalous" if labels.any() else "good"
        raise ADError(
            f"image metrics need both good and anomalous test images; the test set has only {only} images"
        )
    return scores.double().numpy(), labels.numpy()


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Image-level area under the ROC curve of raw scores (N,) against 0/1 labels (N,).

    The Mann-Whitney U statistic, P(anomalous > good) + P(tie) / 2, as ``pixel_auroc`` computes it.
    """
    scores, labels = _image_inputs(scores, labels)
    good, anomalous = np.sort(scores[~labels]), scores[labels]
    below = np.searchsorted(good, anomalous, "left").sum() + np.searchsorted(good, anomalous, "right").sum()
    return float(below / 2 / (len(anomalous) * len(good)))


def image_f1_max(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Best F1 over all thresholds and the raw-score threshold reaching it (anomalous iff score >= threshold).

    Every distinct score is a candidate threshold, as in scikit-learn's precision-recall curve; among
    equally good thresholds the lowest wins. This is the F1-optimal threshold on the evaluated split,
    i.e. what anomalib's adaptive threshold reports.
    """
    thresholds, tp, fp = flagged_counts(*_image_inputs(scores, labels))  # thresholds ascending
    f1 = 2 * tp / (tp + fp + tp[0])  # 2PR / (P + R) from exact counts (tp[0]: all defective); 0 where tp = 0
    best = int(np.argmax(f1))  # first maximum = lowest threshold
    return float(f1[best]), float(thresholds[best])


def _pixel_inputs(maps: torch.Tensor, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Return maps as a float32/float64 numpy array (N, H, W) and masks as bool; check both classes."""
    maps = torch.as_tensor(maps).detach().cpu()
    masks = torch.as_tensor(masks).detach().cpu()
    if maps.shape != masks.shape:
        raise ValueError(f"anomaly maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
    if maps.ndim < 2:
        raise ValueError(f"anomaly maps must be (N, H, W), got shape {tuple(maps.shape)}")
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.double()  # float16/bfloat16/int -> exact in float64; numpy lacks bfloat16
    masks = masks > 0.5 if masks.is_floating_point() else masks != 0
    h, w = maps.shape[-2:]
    maps, masks = maps.reshape(-1, h, w).numpy(), masks.reshape(-1, h, w).numpy()
    if not np.isfinite(maps).all():
        raise ADError("anomaly maps contain NaN or inf; the model produced invalid values, check its fit")
    if not masks.any():
        raise ADError("pixel metrics need masks with anomalous pixels; all masks are empty, check the mask files")
    if masks.all():
        raise ADError("pixel metrics need normal pixels; every mask pixel is anomalous, check masks aren't inverted")
    return maps, masks


class PixelScores:
    """Anomaly-map pixels split by the ground truth and sorted once, for both pixel metrics.

    Sorting the millions of normal pixels is most of the pixel metrics' cost (about 0.2 s per 5 M
    pixels on one core), so it is done once, in one chunk per core (numpy's sort releases the GIL):
    every question the metrics ask of the normal pixels is "how many score below t", which is the
    sum of ``searchsorted`` over the sorted chunks, so the chunks are never merged.
    """

    def __init__(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        maps, masks = _pixel_inputs(maps, masks)
        self.masks = masks
        normal = maps[~masks]
        self.normal_chunks = map_on_cores(np.sort, np.array_split(normal, max(1, torch.get_num_threads())),
                                          name="ad-sort")
        self.n_normal = len(normal)
        self.anomalous = maps[masks]  # in image, row, column order, as ``masks`` lists them
        self.descending = np.argsort(self.anomalous)[::-1]

    def normal_below(self, thresholds: np.ndarray, inclusive: bool = False) -> np.ndarray:
        """How many normal pixels score < each threshold (<= with ``inclusive``)."""
        side = "right" if inclusive else "left"
        return sum(np.searchsorted(chunk, thresholds, side) for chunk in self.normal_chunks)


def pixel_auroc(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """Pixel-level AUROC of raw anomaly maps (N, H, W) against ground-truth masks (N, H, W), over all pixels.

    Computed as the Mann-Whitney U statistic, P(anomalous pixel > normal pixel) + P(tie) / 2, which equals
    the trapezoidal ROC area with ties. It needs only value sorts, several times faster than an argsort
    of millions of pixels.
    """
    return _pixel_auroc(PixelScores(maps, masks))


def _pixel_auroc(pixels: PixelScores) -> float:
    """``pixel_auroc`` of already sorted pixels."""
    anomalous = pixels.anomalous[pixels.descending[::-1]]  # ascending: sorted keys search fastest
    # sum over anomalous pixels of (#normal < p) + (#normal == p) / 2
    below = pixels.normal_below(anomalous).sum() + pixels.normal_below(anomalous, inclusive=True).sum()
    return float(below / 2 / (len(anomalous) * pixels.n_normal))


def pixel_aupro(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit`` FPR, normalised to [0, 1].

    Following the MVTec AD paper and anomalib's ``aupro.py``:
    ground-truth regions are the 8-connected components of each mask; for a threshold t, PRO(t) is the
    mean over all regions of the fraction of the region's pixels scoring >= t, and FPR(t) the fraction of
    all normal pixels (including every pixel of good images) scoring >= t. Equivalently, with each region
    pixel weighted 1 / |region|, PRO(t) = (sum of weights >= t) / #regions. The curve visits every distinct
    score (tied scores form one point), starts at (0, 0), is cut at ``fpr_limit`` by linear interpolation
    and integrated with the trapezoid rule; the area is divided by ``fpr_limit``.

    Instead of one argsort over all pixels, the normal pixels are only value-sorted and counted at each
    distinct anomalous-pixel score: between those scores PRO is constant, so the points skipped lie on
    horizontal segments and change neither the area nor the interpolated cut.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return _pixel_aupro(PixelScores(maps, masks), fpr_limit)


def _pixel_aupro(pixels: PixelScores, fpr_limit: float) -> float:
    """``pixel_aupro`` of already sorted pixels."""
    from scipy import ndimage

    regions, n_regions = ndimage.label(pixels.masks, structure=_STRUCTURE)
    pos_region = regions[pixels.masks]  # same order as pixels.anomalous
    weight = 1.0 / np.bincount(pos_region)[pos_region]  # 1 / size of the pixel's region

    # Anomalous pixels by descending score; the last pixel of each run of equal scores closes a point.
    order = pixels.descending
    pos = pixels.anomalous[order]
    ends = np.append(np.flatnonzero(pos[1:] != pos[:-1]), len(pos) - 1)
    t = pos[ends]  # distinct anomalous scores, descending
    pro_ge = np.cumsum(weight[order])[ends] / n_regions  # PRO at threshold t (scores >= t)
    pro_gt = np.concatenate([[0.0], pro_ge[:-1]])  # PRO just above t (scores > t)
    n_normal = pixels.n_normal
    fpr_ge = (n_normal - pixels.normal_below(t)) / n_normal
    fpr_gt = (n_normal - pixels.normal_below(t, inclusive=True)) / n_normal

    # Curve: (0, 0), then for each t the point just above it and the point at it, then (1, PRO(min)).
    fpr = np.concatenate([[0.0], np.stack([fpr_gt, fpr_ge], 1).ravel(), [1.0]])
    pro = np.concatenate([[0.0], np.stack([pro_gt, pro_ge], 1).ravel(), [pro_ge[-1]]])

    # Cut at fpr_limit: keep points with fpr <= limit and add one linearly interpolated end point.
    k = int(np.searchsorted(fpr, fpr_limit, "right"))  # fpr[k - 1] <= limit < fpr[k]
    if k < len(fpr):
        frac = (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        fpr = np.append(fpr[:k], fpr_limit)
        pro = np.append(pro[:k], pro[k - 1] + frac * (pro[k] - pro[k - 1]))
    area = np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) / 2)
    return float(area / fpr_limit)


def compute_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    maps: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
) -> dict[str, float]:
    """The threshold-free metrics as a flat dict, each only where the test split can measure it.

    Image metrics need good and defective images; pixel metrics need ``maps`` and ``masks`` with
    defective pixels. What cannot be measured is left out, never filled in.
    """
    labels = torch.as_tensor(labels)
    if not (bool((labels == 1).any()) and bool((labels == 0).any())):
        return {}
    f1, threshold = image_f1_max(scores, labels)
    metrics = {"image_AUROC": image_auroc(scores, labels), "image_F1": f1, "image_F1_threshold": threshold}
    if maps is not None and masks is not None and bool(torch.as_tensor(masks).any()):
        pixels = PixelScores(maps, masks)  # one sort of the normal pixels serves both
        metrics["pixel_AUROC"] = _pixel_auroc(pixels)
        metrics["pixel_AUPRO"] = _pixel_aupro(pixels, fpr_limit=0.3)
    return metrics


def operating_point_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    threshold: float | None,
    maps: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    pixel_threshold: float | None = None,
) -> dict[str, float]:
    """Test-split metrics at the operating thresholds (anomalous iff score >= threshold), where measurable.

    ``image_false_reject_rate`` (good images flagged) needs good images, ``image_recall`` and
    ``image_false_accept_rate`` (defective images passed) need defective ones, ``image_precision`` a
    flagged image; pixel F1 and IoU need maps, masks with defective pixels and a pixel threshold.
    """
    metrics: dict[str, float] = {}
    if threshold is not None:
        scores = torch.as_tensor(scores).detach().cpu().double().flatten()
        labels = torch.as_tensor(labels).detach().cpu().flatten().bool()
        flagged = scores >= threshold
        good, bad = ~labels, labels
        if good.any():
            metrics["image_false_reject_rate"] = float(flagged[good].double().mean())
        if bad.any():
            metrics["image_recall"] = float(flagged[bad].double().mean())
            metrics["image_false_accept_rate"] = 1.0 - metrics["image_recall"]
        if flagged.any() and bad.any():
            metrics["image_precision"] = int((flagged & bad).sum()) / int(flagged.sum())
    if pixel_threshold is not None and maps is not None and masks is not None and bool(torch.as_tensor(masks).any()):
        truth = torch.as_tensor(masks).bool()
        predicted = torch.as_tensor(maps) >= pixel_threshold
        tp = int((predicted & truth).sum())
        fp, fn = int((predicted & ~truth).sum()), int((~predicted & truth).sum())
        metrics["pixel_F1"] = 2 * tp / (2 * tp + fp + fn)
        metrics["pixel_IoU"] = tp / (tp + fp + fn)
    return metrics
