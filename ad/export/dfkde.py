"""DFKDE's scoring as a float32 graph: ``Dfkde.forward`` on float32 copies of its PCA and KDE tensors.

``Dfkde`` projects and scores in float64, like the scipy KDE it follows; the export runs in float32,
the precision both runtimes' CPU kernels are built for, so scores differ from float64 by float32
rounding (tested against ``Dfkde.forward``). The log-sum-exp is written out (max, then the log of
the shifted sum): OpenVINO 2026.4 reads ONNX's ``ReduceLogSumExp`` as a reduction over every axis,
which gave one score for the whole batch.
"""

from __future__ import annotations

import math

import torch

from ad.export.scorers import FittedForward
from ad.models.dfkde import Dfkde, anomaly_probability


class DfkdeScorer(FittedForward):
    """(B, 3, S, S) images -> DFKDE's (scores, None), in float32."""

    def __init__(self, model: Dfkde) -> None:
        super().__init__(model, fitted=model.points.numel() > 0)
        for name in ("mean", "components", "max_length", "whiten", "points", "log_norm"):
            self.register_buffer(name, getattr(model, name).float(), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        z = (self.model.embed(images) - self.mean) @ self.components
        z = z / (self.max_length if self.model.scaling == "scale" else z.norm(dim=1, keepdim=True))
        return anomaly_probability(self.log_density(z)), None

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        """``ad.ops.kde.kde_log_density`` of (B, d) scaled PCA coordinates, its log-sum-exp spelled out."""
        y = z @ self.whiten
        squared = (y.square().sum(1, keepdim=True) + self.points.square().sum(1) - 2 * y @ self.points.T).clamp_min(0)
        exponent = -0.5 * squared
        top = exponent.amax(1, keepdim=True)
        log_sum = (exponent - top).exp().sum(1).log() + top[:, 0]
        return log_sum - math.log(self.points.shape[0]) + self.log_norm
