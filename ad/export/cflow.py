"""CFlow's scoring as a static graph: ``Cflow.forward`` with the position codes broadcast over the batch.

``Cflow`` repeats each layer's position code by a count read from the batch as a Python number, which
a traced graph would freeze at the tracing batch; here the code is expanded along a batch dimension
instead, so one graph serves every batch size. Flows, maxima and upsampling are the model's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ad.export.scorers import FittedForward
from ad.models.cflow import Cflow, positional_encoding_2d


class CflowScorer(FittedForward):
    """(B, 3, S, S) images -> CFlow's (scores, maps)."""

    def __init__(self, model: Cflow) -> None:
        super().__init__(model, fitted=not torch.isnan(model.train_max_log_p).any())  # training likelihoods set

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        likelihood = torch.zeros_like(images[:, :1])
        for i, (feature, decoder) in enumerate(zip(m.extractor(images), m.decoders, strict=True)):
            b, channels, height, width = feature.shape
            code = positional_encoding_2d(m.condition_vector, height, width).to(feature.device).flatten(1).T
            fibers = feature.permute(0, 2, 3, 1).reshape(-1, channels)
            conditions = code.expand(b, -1, -1).reshape(-1, code.shape[1])
            log_p = decoder(fibers, conditions).reshape(b, 1, height, width)
            layer = torch.exp(log_p - m.train_max_log_p[i])
            likelihood = likelihood + F.interpolate(layer, size=images.shape[-2:], mode="bilinear", align_corners=True)
        maps = len(m.decoders) - likelihood[:, 0]
        return maps.flatten(1).amax(1), maps
