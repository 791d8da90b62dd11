"""The interface every method implements: fit on good images, then score images."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ad.backbone import FeatureExtractor


@dataclass
class Prediction:
    """Per-image anomaly scores (B,) and, for methods that localise, anomaly maps (B, H, W)."""

    scores: torch.Tensor
    maps: torch.Tensor | None = None


class AnomalyModel(nn.Module):
    """Base class: ``fit`` learns normality from batches of good images, ``forward`` scores a batch.

    Batches are the dicts produced by ``ad.data`` (``image`` is a normalised (B, 3, H, W) tensor).
    A method's scores must not depend on which other images share its batch.
    """

    #: False for classification-only methods (no maps: pixel metrics are skipped, never faked).
    produces_maps: bool = True

    def fit(self, batches: Iterable[dict], device: torch.device) -> None:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> Prediction:
        raise NotImplementedError

    @property
    def weights_source(self) -> str:
        """Where the backbone weights came from (imagenet, file, random), or 'none' without a backbone."""
        sources = sorted({m.weights_source for m in self.modules() if isinstance(m, FeatureExtractor)})
        return "+".join(sources) if sources else "none"
