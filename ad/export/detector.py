"""The whole detector as one module: pixels in, verdicts out, so an exported file needs no code around it.

Input: (B, S, S, 3) RGB images at the bundle's size, uint8 0..255 or float32 0..1. Inside: the run's
ImageNet normalisation (the same float32 multiply-add as ``ad.data.tensors.normalize_batch``), the
method's scoring graph (``ad.export.scorers``), and the thresholds. Outputs, in order: ``score`` (B,),
``label`` (B,) uint8, 1 = anomalous (when the bundle has an image threshold), and for map methods
``anomaly_map`` (B, S, S) and ``mask`` (B, S, S) uint8 (when it has a pixel threshold).
"""

from __future__ import annotations

import torch
from torch import nn

from ad.export.metadata import INPUT_KINDS


class Detector(nn.Module):
    """Normalisation, scoring graph and thresholds of a bundle in one module (see module docstring)."""

    def __init__(self, scorer: nn.Module, preprocessing: dict, image_threshold: float | None,
                 pixel_threshold: float | None, produces_maps: bool, input_kind: str = "uint8") -> None:
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"Detector: input kind '{input_kind}' is not one of {', '.join(INPUT_KINDS)}")
        self.scorer, self.input_kind, self.produces_maps = scorer, input_kind, produces_maps
        self.image_threshold, self.pixel_threshold = image_threshold, pixel_threshold
        mean = torch.tensor(preprocessing["mean"], dtype=torch.float32)
        std = torch.tensor(preprocessing["std"], dtype=torch.float32)
        peak = 255.0 if input_kind == "uint8" else 1.0
        self.register_buffer("scale", 1.0 / (peak * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs ``forward`` returns, in order."""
        names = ["score"] + (["label"] if self.image_threshold is not None else [])
        if self.produces_maps:
            names += ["anomaly_map"] + (["mask"] if self.pixel_threshold is not None else [])
        return names

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) pixels -> ImageNet-normalised float32 (B, 3, S, S)."""
        return (images.float() * self.scale + self.shift).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, maps = self.scorer(self.normalize(images))
        outputs = [scores.float()]
        if self.image_threshold is not None:
            outputs.append((outputs[0] >= self.image_threshold).to(torch.uint8))
        if self.produces_maps:
            outputs.append(maps.float())
            if self.pixel_threshold is not None:
                outputs.append((outputs[-1] >= self.pixel_threshold).to(torch.uint8))
        return tuple(outputs)


def detector_of(bundle, input_kind: str = "uint8") -> Detector:
    """The ``Detector`` of a loaded ``ad.bundle.Bundle`` (its model switched to fp32 in place)."""
    from ad.export.scorers import scorer_for

    return Detector(scorer_for(bundle.model), bundle.meta["preprocessing"], bundle.image_threshold,
                    bundle.pixel_threshold, bundle.produces_maps, input_kind).eval()
