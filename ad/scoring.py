"""Scoring a split with a fitted model, and the operating thresholds set from the validation split's scores.

Test metrics, thresholds and the trainer's periodic evaluation all score through ``score``: the
same batches, the same numerics, whichever split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from ad.metrics import compute_metrics
from ad.models import AnomalyModel
from ad.thresholds import Threshold, calibrate, calibrate_pixels


@dataclass
class TestOutputs:
    """Everything scored on the test split, on the CPU, in dataset order."""

    scores: torch.Tensor
    labels: torch.Tensor
    maps: torch.Tensor | None
    masks: torch.Tensor | None


def progress(loader: DataLoader, desc: str) -> tqdm:
    """A progress bar over batches, shown only on an interactive terminal."""
    return tqdm(loader, desc=desc, unit="batch", leave=False, disable=None, dynamic_ncols=True)


@torch.inference_mode()
def score(model: AnomalyModel, loader: DataLoader, device: torch.device, keep_maps: bool) -> TestOutputs:
    """Score every image of a split; maps and masks are kept only when asked (pixel metrics, thresholds)."""
    scores, labels, maps, masks = [], [], [], []
    for batch in progress(loader, "test"):
        prediction = model(batch["image"].to(device, non_blocking=True))
        scores.append(prediction.scores.float().cpu())
        labels.append(batch["label"])
        if keep_maps:
            maps.append(prediction.maps.float().cpu())
            masks.append(batch["mask"].bool())
    return TestOutputs(
        scores=torch.cat(scores), labels=torch.cat(labels),
        maps=torch.cat(maps) if keep_maps else None, masks=torch.cat(masks) if keep_maps else None,
    )


def set_thresholds(settings: DictConfig, model: AnomalyModel, loader: DataLoader | None,
                   device: torch.device) -> tuple[Threshold | None, Threshold | None]:
    """The image and pixel operating thresholds, from the validation split's scores and maps (never the test split)."""
    outputs = score(model, loader, device, keep_maps=model.produces_maps) if loader is not None else None
    image = calibrate(settings, None if outputs is None else outputs.scores.numpy(),
                      None if outputs is None else outputs.labels.numpy())
    good_maps = None
    if outputs is not None and outputs.maps is not None:
        good_maps = outputs.maps[outputs.labels == 0].numpy()
    pixel = calibrate_pixels(settings, good_maps) if model.produces_maps else None
    return image, pixel


def threshold_results(image: Threshold | None, pixel: Threshold | None) -> dict:
    """The thresholds as results: their values, and how far the image one can be trusted."""
    results = {}
    if image is not None:
        results.update(image_threshold=image.value, threshold_method=image.method)
        if image.false_reject_rate_bound is not None:
            results.update(image_threshold_frr_bound=round(image.false_reject_rate_bound, 4),
                           n_val_good=image.n_calibration)
    if pixel is not None:
        results["pixel_threshold"] = pixel.value
    return results


def evaluate(model: AnomalyModel, loader: DataLoader, device: torch.device, keep_maps: bool) -> dict:
    """Score the test split and compute its metrics."""
    outputs = score(model, loader, device, keep_maps)
    return compute_metrics(outputs.scores, outputs.labels, outputs.maps, outputs.masks)
