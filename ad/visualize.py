"""Anomaly-map panels for people: [input | heat map over input with ground-truth outline].

Everything is numpy on whole arrays; matplotlib only supplies the colour map (no figures).
"""

from __future__ import annotations

import numpy as np

__all__ = ["colorize", "mask_outline", "overlay_panel", "pick_examples"]

HEAT_ALPHA = 0.5  # weight of the heat map in the blend; the rest is the input image
OUTLINE_COLOR = (255, 255, 255)  # white never occurs in a jet blend, so the outline stays visible
GAP = 4  # pixels between the two halves of a panel
BACKGROUND = (32, 32, 32)
TEXT_COLOR = (255, 255, 255)


def colorize(anomaly_map: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """Map raw scores to uint8 RGB with a fixed ``vmin..vmax`` range, so colours compare across images."""
    import matplotlib

    span = max(float(vmax) - float(vmin), np.finfo(np.float32).eps)
    norm = np.nan_to_num((np.asarray(anomaly_map, dtype=np.float32) - vmin) / span, nan=0.0)
    return matplotlib.colormaps[cmap](np.clip(norm, 0.0, 1.0), bytes=True)[..., :3]


def mask_outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Return the inner boundary of a bool mask, ``thickness`` pixels wide (mask XOR its erosion)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    eroded = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask ^ eroded


def overlay_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    vmin: float,
    vmax: float,
    title: str | None = None,
) -> np.ndarray:
    """Render ``[image | heat map blended over image + ground-truth outline]`` as one uint8 RGB panel.

    Args:
        image: uint8 HxWx3 (HxW grey is accepted).
        anomaly_map: float HxW in raw score units.
        mask: bool HxW ground truth, or None for no outline.
        vmin, vmax: score range mapped to the ends of the colour map; keep them fixed per run.
        title: optional text (score, label, defect) drawn in a strip above the panel.

    Returns:
        uint8 array of shape ``(strip + H + legend, 2 * W + GAP, 3)``; the bottom legend shows
        the colour scale with ``vmin`` and ``vmax``.
    """
    image = as_rgb(image)
    height, width = image.shape[:2]
    if np.shape(anomaly_map) != (height, width):
        raise ValueError(f"anomaly_map shape {np.shape(anomaly_map)} != image shape {(height, width)}")
    heat = colorize(anomaly_map, vmin, vmax)
    blend = (1.0 - HEAT_ALPHA) * image + HEAT_ALPHA * heat
    overlay = np.rint(blend).astype(np.uint8)
    if mask is not None:
        if np.shape(mask) != (height, width):
            raise ValueError(f"mask shape {np.shape(mask)} != image shape {(height, width)}")
        overlay[mask_outline(mask, outline_thickness(height, width))] = OUTLINE_COLOR
    gap = np.full((height, GAP, 3), BACKGROUND, dtype=np.uint8)
    panel = np.concatenate([image, gap, overlay], axis=1)
    parts = [panel, legend_strip(panel.shape[1], width, vmin, vmax)]
    if title:
        parts.insert(0, text_strip(panel.shape[1], title))
    return np.concatenate(parts, axis=0)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Return a uint8 HxWx3 view of a grey (HxW, HxWx1) or RGB uint8 image."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be HxWx3 (or HxW grey), got shape {image.shape}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def outline_thickness(height: int, width: int) -> int:
    """Return an outline width that stays visible on large images: 1 px per 256 px of the short side."""
    return max(1, min(height, width) // 256)


def text_strip(width: int, text: str) -> np.ndarray:
    """Render one line of text on a dark strip ``width`` pixels wide (PIL's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 6
    strip = Image.new("RGB", (width, line_height), BACKGROUND)
    ImageDraw.Draw(strip).text((4, 2), text, fill=TEXT_COLOR, font=font)
    return np.asarray(strip)


def legend_strip(width: int, bar_width: int, vmin: float, vmax: float) -> np.ndarray:
    """Render the colour scale: ``vmin`` and ``vmax`` as text on the left, a jet bar under the map."""
    strip = text_strip(width, f"heat map {vmin:.3g} .. {vmax:.3g}")
    height = strip.shape[0]
    ramp = np.linspace(vmin, vmax, bar_width, dtype=np.float32)
    bar = colorize(np.broadcast_to(ramp, (height - 4, bar_width)), vmin, vmax)
    strip = strip.copy()
    strip[2:-2, width - bar_width :] = bar
    return strip


def pick_examples(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Pick up to ``k`` informative test images, deterministically.

    Draws in turn from three queues: highest-scoring anomalies (clear detections), highest-scoring
    good images (false alarms) and lowest-scoring anomalies (misses). Ties go to the lower index.
    Returns the anomalies by descending score, then the good images by descending score.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    by_score = np.argsort(-scores, kind="stable")  # descending, ties by index
    anomalous = by_score[labels[by_score]]
    good = by_score[~labels[by_score]]
    ascending_anomalous = anomalous[np.argsort(scores[anomalous], kind="stable")]
    queues = [list(anomalous), list(good), list(ascending_anomalous)]
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < max(0, int(k)) and any(queues):
        for queue in queues:
            while queue and queue[0] in seen:
                queue.pop(0)
            if queue and len(chosen) < k:
                seen.add(queue[0])
                chosen.append(queue.pop(0))
    picked = np.asarray(chosen, dtype=np.int64)
    order = np.lexsort((picked, -scores[picked], ~labels[picked]))
    return picked[order]
