"""Operating thresholds set on good images: the order-statistic rule, its bound, and the other methods."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ad.data.base import seeded_split
from ad.errors import ADError
from ad.metrics import compute_metrics, operating_point_metrics
from ad.thresholds import calibrate, calibrate_pixels, from_false_reject_rate


def settings(**overrides):
    base = {"method": "false_reject_rate", "false_reject_rate": 0.05, "pixel_false_reject_rate": None,
            "value": None, "pixel_value": None}
    return OmegaConf.create({**base, **overrides})


def test_false_reject_rate_holds_on_new_good_images() -> None:
    """Over many draws, good images from the same distribution are rejected at most at the target rate."""
    rng = np.random.default_rng(0)
    rejected = []
    for _ in range(400):
        threshold = from_false_reject_rate(rng.normal(size=99), 0.05)
        rejected.append(np.mean(rng.normal(size=2000) >= threshold.value))
    assert np.mean(rejected) <= 0.05 + 0.005  # conformal: E[rate] = (n + 1 - k) / (n + 1) = 5/100
    assert np.mean(rejected) > 0.03  # and not needlessly strict


def test_bound_tightens_with_more_images() -> None:
    rng = np.random.default_rng(1)
    few, many = from_false_reject_rate(rng.normal(size=9), 0.05), from_false_reject_rate(rng.normal(size=999), 0.05)
    assert few.n_calibration == 9 and many.n_calibration == 999
    assert many.false_reject_rate_bound < 0.07 < few.false_reject_rate_bound
    # 9 images cannot reach 5%: the largest score is used, and the bound says how loose that is
    assert few.false_reject_rate_bound == pytest.approx(1 - 0.05 ** (1 / 9), rel=1e-6)


def test_threshold_passes_the_calibration_maximum_when_rate_is_unreachable() -> None:
    scores = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    threshold = from_false_reject_rate(scores, 0.01)
    assert threshold.value > 3.0 and np.float32(threshold.value) > np.float32(3.0)
    assert not (scores >= threshold.value).any()


def test_f1_method_uses_labelled_validation() -> None:
    scores, labels = np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1])
    threshold = calibrate(settings(method="f1"), scores, labels)
    assert threshold.method == "f1" and 0.3 < threshold.value <= 0.8
    with pytest.raises(ADError, match="abnormal_val_dir"):
        calibrate(settings(method="f1"), scores[:3], labels[:3])


def test_manual_none_and_empty_validation() -> None:
    assert calibrate(settings(method="manual", value=3.5), None, None).value == 3.5
    assert calibrate(settings(method="none"), np.ones(3), None) is None
    with pytest.raises(ADError, match="val_ratio"):
        calibrate(settings(), np.array([]), None)
    with pytest.raises(ADError, match="threshold.method: 'median'"):
        calibrate(settings(method="median"), np.ones(3), None)
    with pytest.raises(ADError, match="false_reject_rate"):
        calibrate(settings(false_reject_rate=1.5), np.ones(3), None)


def test_pixel_threshold_is_the_good_pixel_quantile() -> None:
    maps = np.random.default_rng(2).random((4, 32, 32)).astype(np.float32)
    threshold = calibrate_pixels(settings(false_reject_rate=0.1), maps)
    assert np.mean(maps >= threshold.value) == pytest.approx(0.1, abs=0.002)
    assert calibrate_pixels(settings(method="manual"), maps) is None  # no pixel_value given


def test_operating_point_metrics_count_exactly() -> None:
    scores = torch.tensor([0.1, 0.6, 0.2, 0.7, 0.9, 0.4])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    metrics = operating_point_metrics(scores, labels, 0.5)
    assert metrics["image_false_reject_rate"] == pytest.approx(1 / 3)
    assert metrics["image_recall"] == pytest.approx(2 / 3)
    assert metrics["image_false_accept_rate"] == pytest.approx(1 / 3)
    assert metrics["image_precision"] == pytest.approx(2 / 3)
    good_only = operating_point_metrics(scores[:3], labels[:3], 0.5)
    assert good_only == {"image_false_reject_rate": pytest.approx(1 / 3)}


def test_pixel_f1_and_iou_at_the_pixel_threshold() -> None:
    maps = torch.zeros(1, 4, 4)
    maps[0, :2, :2] = 1.0  # 4 flagged pixels, 3 of them defects
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :1] = True
    masks[0, 0, 1] = True
    masks[0, 3, 3] = True  # one missed
    metrics = operating_point_metrics(torch.ones(1), torch.ones(1), None, maps, masks, 0.5)
    assert metrics == {"pixel_F1": pytest.approx(6 / 8), "pixel_IoU": pytest.approx(3 / 5)}


def test_threshold_free_metrics_are_absent_without_defects() -> None:
    assert compute_metrics(torch.rand(5), torch.zeros(5)) == {}


def test_seeded_split_is_stable_and_checked() -> None:
    paths = [Path(f"img{i}.png") for i in range(20)]
    kept, held = seeded_split(paths, 0.1, 7, "dataset.val_ratio")
    assert len(held) == 2 and set(kept) | set(held) == set(paths)
    assert seeded_split(paths, 0.1, 7, "dataset.val_ratio") == (kept, held)
    assert seeded_split(paths, 0.1, 8, "dataset.val_ratio")[1] != held
    assert seeded_split(paths, 0.0, 7, "k") == (paths, [])
    with pytest.raises(ADError, match="dataset.val_ratio"):
        seeded_split(paths[:1], 0.5, 7, "dataset.val_ratio")


@pytest.mark.parametrize(("override", "message"), [
    ("threshold.method=median", "threshold.method: 'median' is not one of"),
    ("threshold.false_reject_rate=0", "threshold.false_reject_rate: must be"),
    ("threshold.method=manual", "threshold.value: threshold.method=manual needs it"),
    ("dataset.val_ratio=0", "dataset.val_ratio: 0 leaves no validation images"),
    ("dataset.val_ratio=1.0", "dataset.val_ratio: must be"),
])
def test_threshold_settings_are_checked_before_anything_runs(override, message):
    from helpers import compose_config

    from ad.errors import ConfigError
    from ad.validate import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(override), "padim")
    check_config(compose_config("dataset.val_ratio=0", "threshold.method=none"), "padim")


def test_a_folder_lists_its_defective_validation_images_for_f1(tmp_path):
    from ad.data import Folder, make_mvtec_layout

    make_mvtec_layout(tmp_path, "widget", n_train=10, n_test_good=2, n_test_defect=5, image_size=32, seed=0)
    test_dir = tmp_path / "widget" / "test"
    defect_dir = next(p for p in test_dir.iterdir() if p.name != "good")
    dataset = Folder(normal_dir=str(tmp_path / "widget" / "train" / "good"), val_ratio=0.2,
                     abnormal_val_dir=str(defect_dir), image_size=32)
    labels = sorted(sample.label for sample in dataset.val)
    assert labels.count(1) == len(list(defect_dir.iterdir())) and labels.count(0) == 2
    assert not {s.image for s in dataset.val} & {s.image for s in dataset.train}
