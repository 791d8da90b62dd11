"""Tests for ad.metrics and ad.curves against scikit-learn and a brute-force MVTec-AD-style AUPRO reference."""

import subprocess
import sys
from bisect import bisect

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score, roc_curve

from ad import curves
from ad.errors import ADError
from ad.metrics import compute_metrics, image_auroc, image_f1_max, pixel_aupro, pixel_auroc

# ----------------------------------------------------------------------------- helpers


def _image_data(seed: int, n: int = 200, scale: float = 1000.0):
    """Raw scores (far outside [0, 1]) loosely correlated with random labels."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.4).long()
    labels[0], labels[1] = 0, 1
    scores = (torch.randn(n, generator=g) + 1.2 * labels) * scale + 5 * scale
    return scores, labels


def _pixel_data(seed: int, n: int = 6, size: int = 24, levels: int | None = None):
    """Smooth blob masks (some images fully good) and maps correlated with them; ``levels`` quantises for ties."""
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 2, 2))
    masks = blobs > 0.6 * blobs.std()
    masks[0] = False  # a good image: all of its pixels are normal
    maps = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1.5, 1.5)) + 0.5 * rng.standard_normal(masks.shape)
    maps = maps * 300 + 50  # raw scale, like distances
    if levels is not None:
        maps = np.round((maps - maps.min()) / np.ptp(maps) * levels)
    return torch.from_numpy(maps.astype(np.float32)), torch.from_numpy(masks)


def _trapezoid(x, y, x_max):
    """Trapezoid area under (x, y) up to x_max, interpolating the cut (as in the MVTec AD evaluation code)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def _aupro_reference(maps, masks, thresholds, fpr_limit=0.3):
    """Brute force: per threshold, FPR over normal pixels and mean overlap over 8-connected regions."""
    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks, dtype=bool)
    regions = []  # (image index, region mask), labelled image by image
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    fprs, pros = [], []
    for t in sorted(thresholds, reverse=True):
        pred = maps >= t
        fprs.append((pred & ~masks).sum() / (~masks).sum())
        pros.append(np.mean([pred[i][region].mean() for i, region in regions]))
    return _trapezoid(fprs, pros, fpr_limit) / fpr_limit


def _all_thresholds(maps):
    """Every distinct score, plus +inf for the (0, 0) start of the curve."""
    return np.append(np.unique(np.asarray(maps, dtype=np.float64)), np.inf)


# ----------------------------------------------------------------------------- image AUROC


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn(seed):
    scores, labels = _image_data(seed)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_image_metrics_raw_scores_with_tiny_differences_have_no_ties(dtype):
    # 280 scores around 5000, one float32 ulp (~5e-4) or 1e-9 apart, plus outliers stretching the range to
    # 100..10000: a sigmoid would make every score 1.0, float32 min-max scaling would merge the neighbours.
    g = torch.Generator().manual_seed(0)
    k = torch.randperm(280, generator=g)
    if dtype == torch.float32:
        band = (torch.tensor(5000.0).view(torch.int32) + k.int()).view(torch.float32)  # consecutive floats
    else:
        band = 5000.0 + k.double() * 1e-9
    scores = torch.cat([band, torch.linspace(100, 110, 10, dtype=dtype), torch.linspace(9990, 10000, 10, dtype=dtype)])
    labels = torch.cat([(k >= 140).long(), torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    labels[torch.randperm(280, generator=g)[:40]] ^= 1  # noisy, so the order inside the band matters
    assert len(torch.unique(scores)) == len(scores)
    expected = roc_auc_score(labels.numpy(), scores.double().numpy())
    assert 0.7 < expected < 0.95
    assert image_auroc(scores, labels) == pytest.approx(expected, abs=1e-6)
    f1, threshold = image_f1_max(scores, labels)
    precision, recall, _ = precision_recall_curve(labels.numpy(), scores.double().numpy())
    assert f1 == pytest.approx(np.nanmax(2 * precision * recall / (precision + recall)), abs=1e-12)
    assert threshold in scores.tolist()
    # The trap this guards against: computed in float32, the 1e-9 neighbours would merge into ties.
    if dtype == torch.float64:
        assert len(torch.unique(scores.float())) < len(scores)


def test_image_auroc_edge_cases():
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert image_auroc(torch.tensor([1.0, 2.0, 3.0, 400.0, 500.0]), labels) == 1.0
    assert image_auroc(torch.tensor([400.0, 500.0, 600.0, 1.0, 2.0]), labels) == 0.0
    assert image_auroc(torch.full((5,), 7e3), labels) == 0.5
    tied = torch.tensor([5.0, 9.0, 9.0, 9.0, 20.0])  # ties across classes count 1/2
    assert image_auroc(tied, labels) == pytest.approx(roc_auc_score(labels, tied))
    assert image_auroc(-tied * 1e6, labels) == pytest.approx(roc_auc_score(labels, -tied))
    assert image_auroc(tied.numpy(), labels.bool().numpy()) == pytest.approx(roc_auc_score(labels, tied))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [3, 12])
def test_image_auroc_with_ties_matches_sklearn(seed, levels):
    scores, labels = _image_data(seed)
    scores = torch.round((scores - scores.min()) / (scores.max() - scores.min()) * levels) * 1e3  # many ties
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_image_metrics_take_half_precision_scores(dtype):
    scores, labels = _image_data(0)
    low = (scores / 100).to(dtype)  # rounded: ties, compared exactly after conversion to float64
    expected = low.double().numpy()
    assert image_auroc(low, labels) == pytest.approx(roc_auc_score(labels, expected), abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, expected)
    assert image_f1_max(low, labels)[0] == pytest.approx(np.nanmax(2 * precision * recall / (precision + recall)))


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_single_class_labels_raise(labels):
    """The metric functions refuse one class; the run's summary leaves those metrics out instead."""
    scores, labels = torch.tensor([1.0, 2.0, 3.0]), torch.tensor(labels)
    for fn in (image_auroc, image_f1_max):
        with pytest.raises(ADError, match="both good and anomalous"):
            fn(scores, labels)
    assert compute_metrics(scores, labels) == {}


def test_non_finite_scores_raise():
    with pytest.raises(ADError, match="NaN"):
        image_auroc(torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- image F1


@pytest.mark.parametrize("seed", range(5))
def test_image_f1_max_matches_sklearn(seed):
    scores, labels = _image_data(seed, scale=1000.0 * (seed + 1))
    scores = torch.round(scores / 300)  # coarse scores: many ties
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected = np.nanmax(2 * precision * recall / (precision + recall))
    f1, threshold = image_f1_max(scores, labels)
    assert f1 == pytest.approx(expected, abs=1e-6)
    assert threshold in scores.tolist()  # a raw score, not a [0, 1] value
    assert f1_score(labels, (scores >= threshold).long()) == pytest.approx(f1, abs=1e-6)


def test_image_f1_max_constant_scores():
    # One threshold only: every image flagged, F1 = 2 * 2 / (5 + 2); no higher threshold exists.
    scores, labels = torch.full((5,), 7e3), torch.tensor([0, 0, 1, 0, 1])
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected = np.nanmax(2 * precision * recall / (precision + recall))
    assert expected == pytest.approx(4 / 7)
    assert image_f1_max(scores, labels) == (pytest.approx(expected, abs=1e-12), 7e3)


def test_image_f1_max_takes_the_lowest_of_equally_good_thresholds():
    # t = 2 flags {2, 3} (tp 1, fp 1: F1 1/2), t = 3 flags {3} (tp 1: F1 2/3), t = 1 flags all (tp 2, fp 2: 2/3).
    scores, labels = torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([1, 0, 0, 1])
    assert image_f1_max(scores, labels) == (pytest.approx(2 / 3), 1.0)


def test_image_f1_max_perfect_separation():
    scores = torch.tensor([3.0, 1.0, 250.0, 2.0, 900.0, 300.0], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    assert image_f1_max(scores, labels) == (1.0, 250.0)


# ----------------------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 20])
def test_pixel_auroc_matches_sklearn(seed, levels):
    maps, masks = _pixel_data(seed, levels=levels)
    expected = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-10)
    # More anomalous than normal pixels.
    assert pixel_auroc(maps, ~masks) == pytest.approx(1 - expected, abs=1e-10)


@pytest.mark.parametrize("threads", [1, 3])
def test_pixel_metrics_do_not_depend_on_how_many_chunks_the_normal_pixels_are_sorted_in(threads):
    maps, masks = _pixel_data(0, levels=20)  # ties across chunk borders
    expected = compute_metrics(maps.flatten(1).amax(1), masks.flatten(1).any(1).long(), maps, masks)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = compute_metrics(maps.flatten(1).amax(1), masks.flatten(1).any(1).long(), maps, masks)
    finally:
        torch.set_num_threads(before)
    assert got["pixel_AUROC"] == pytest.approx(expected["pixel_AUROC"], abs=1e-12)
    assert got["pixel_AUPRO"] == pytest.approx(expected["pixel_AUPRO"], abs=1e-12)
    assert got["pixel_AUROC"] == pytest.approx(roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy()),
                                               abs=1e-10)


def test_pixel_auroc_edge_cases():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[1, 1:3, 1:3] = True
    assert pixel_auroc(masks.float() * 1e4, masks) == 1.0
    assert pixel_auroc(-masks.float() * 1e4, masks) == 0.0
    assert pixel_auroc(torch.full((2, 4, 4), 3e3), masks) == 0.5
    # float16 maps, (N, 1, H, W) shape and 0/255 integer masks are accepted.
    maps, masks = _pixel_data(0, levels=30)
    expected = pixel_auroc(maps, masks)
    assert pixel_auroc(maps.half().unsqueeze(1), (masks * 255).to(torch.uint8).unsqueeze(1)) == expected


def test_pixel_metrics_need_both_pixel_classes():
    maps = torch.rand(2, 4, 4)
    for fn in (pixel_auroc, pixel_aupro):
        with pytest.raises(ADError, match="all masks are empty"):
            fn(maps, torch.zeros(2, 4, 4))
        with pytest.raises(ADError, match="every mask pixel is anomalous"):
            fn(maps, torch.ones(2, 4, 4))


# ----------------------------------------------------------------------------- pixel AUPRO


def test_pixel_aupro_hand_computed():
    # One row, regions A = {0, 1} (weight 1/2 each) and B = {4}; normal pixels {2, 3}.
    masks = torch.tensor([[[1, 1, 0, 0, 1]]], dtype=torch.bool)
    maps = torch.tensor([[[0.9, 0.7, 0.7, 0.1, 0.3]]])
    # Curve (0,0) -> (0,.25) [A at .9] -> (.5,.5) [A and a normal pixel tie at .7] -> (.5,1) [B] -> (1,1).
    assert pixel_aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5 * (0.25 + 0.5) / 2 + 0.5 * 1.0)  # 0.6875
    # Cut at .3 interpolates on the tie segment: PRO(.3) = .25 + .25 * .3 / .5 = .4.
    assert pixel_aupro(maps, masks) == pytest.approx(0.3 * (0.25 + 0.4) / 2 / 0.3)  # 0.325


def test_pixel_aupro_regions_do_not_connect_across_images():
    # Region A (image 0, 2 px) and region B (image 1, 1 px) overlap in position; merged they would be one region.
    masks = torch.tensor([[[1, 1, 0]], [[1, 0, 0]]], dtype=torch.bool)
    maps = torch.tensor([[[0.9, 0.2, 0.5]], [[0.4, 0.1, 0.3]]])
    # (0,0) (0,.25) (1/3,.25) (1/3,.75) (2/3,.75) ...: area to .5 = .25/3 + .75/6 = 5/24.
    assert pixel_aupro(maps, masks, fpr_limit=0.5) == pytest.approx(5 / 12)
    assert pixel_aupro(maps, masks, fpr_limit=1.0) == pytest.approx(2 / 3)


def test_pixel_aupro_uses_8_connectivity():
    # (0,0) touches (1,1) only diagonally: one region of 3 pixels (4-connectivity would give 2 regions).
    masks = torch.zeros(1, 3, 3, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 2, 1] = True
    maps = torch.full((1, 3, 3), 0.5)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 2, 1] = 0.9, 0.2, 0.2
    assert pixel_aupro(maps, masks) == pytest.approx(1 / 3)


def test_pixel_aupro_perfect_and_reversed():
    maps, masks = _pixel_data(1)
    assert pixel_aupro(masks.float() * 500, masks) == pytest.approx(1.0)
    assert pixel_aupro(-masks.float() * 500, masks) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 12])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_pixel_aupro_matches_reference_exactly(seed, levels, fpr_limit):
    # Every distinct score as a threshold: the reference traces the same curve point by point.
    maps, masks = _pixel_data(seed, n=4, size=12, levels=levels)
    expected = _aupro_reference(maps, masks, _all_thresholds(maps), fpr_limit)
    assert pixel_aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_pixel_aupro_matches_reference_on_threshold_grid():
    maps, masks = _pixel_data(7, n=8, size=48)
    grid = np.append(np.linspace(float(maps.min()), float(maps.max()), 400), np.inf)
    expected = _aupro_reference(maps, masks, grid)
    assert 0.2 < expected < 0.95
    assert pixel_aupro(maps, masks) == pytest.approx(expected, abs=5e-3)


# ----------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_keys():
    scores, labels = _image_data(0, n=6)
    maps, masks = _pixel_data(0, n=6)
    image_keys = {"image_AUROC", "image_F1", "image_F1_threshold"}
    assert set(compute_metrics(scores, labels)) == image_keys
    assert set(compute_metrics(scores, labels, maps=maps)) == image_keys
    assert set(compute_metrics(scores, labels, masks=masks)) == image_keys
    metrics = compute_metrics(scores, labels, maps, masks)
    assert set(metrics) == image_keys | {"pixel_AUROC", "pixel_AUPRO"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["pixel_AUROC"] == pixel_auroc(maps, masks)
    assert metrics["pixel_AUPRO"] == pixel_aupro(maps, masks)


# ----------------------------------------------------------------------------- curves (NumPy only, for the report)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 6])
def test_curves_match_sklearn(seed, levels):
    scores, labels = _image_data(seed, n=60)
    if levels is not None:  # ties, one of them across the classes
        scores = torch.round((scores - scores.min()) / (scores.max() - scores.min()) * levels)
    scores, labels = scores.double().numpy(), labels.numpy()
    fpr, tpr = curves.roc_curve(scores, labels)
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    precision, recall = curves.precision_recall_curve(scores, labels)
    sk_precision, sk_recall, _ = precision_recall_curve(labels, scores)  # lowest threshold first, then the (1, 0) end
    np.testing.assert_allclose(precision, sk_precision[::-1], atol=1e-12)
    np.testing.assert_allclose(recall, sk_recall[::-1], atol=1e-12)


def test_curves_need_no_torch():
    code = "import sys, ad.curves, ad.report.plots; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
