"""PaDiM's scoring as a static graph: the same embedding and block Mahalanobis distances as ``Padim.forward``.

``Padim`` writes each layer's kept channels into a preallocated position-major buffer (in-place copies
into views, which graph exporters do not carry); here each layer's channels are picked, upsampled by
``F.interpolate`` (the nearest rule ``Padim`` reproduces) and concatenated, then the model's own
``block_mahalanobis`` and map smoother run on its own buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ad.export.scorers import FittedForward
from ad.models.padim import Padim
from ad.ops.gaussian import BlockGaussians, block_mahalanobis
from ad.postprocess import max_score


class PadimScorer(FittedForward):
    """(B, 3, S, S) images -> PaDiM's (scores, maps), the Gaussians embedded as the model's buffers."""

    def __init__(self, model: Padim) -> None:
        super().__init__(model, fitted=model.mean.numel() > 0)
        bounds = torch.tensor([0, *model.extractor.channels]).cumsum(0).tolist()
        for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            kept = model.channel_idx[(model.channel_idx >= start) & (model.channel_idx < stop)] - start
            self.register_buffer(f"keep{i}", kept, persistent=False)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """(B, 3, S, S) -> (P, B, C) kept channels of every layer on the first layer's grid, and that grid."""
        features = self.model.extractor(images)
        grid = features[0].shape[-2:]
        parts = [F.interpolate(f.index_select(1, getattr(self, f"keep{i}")), size=grid, mode="nearest")
                 for i, f in enumerate(features)]
        embedding = torch.cat(parts, dim=1)
        return embedding.flatten(2).permute(2, 0, 1), grid

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        embedding, grid = self.embed(images)
        delta = embedding - m.mean.unsqueeze(1)
        gaussians = BlockGaussians(m.mean, m.whitening_fine, m.coupling, m.whitening_coarse)
        squared = block_mahalanobis(delta, gaussians, m.cell_of, m.representative)  # (P, B)
        distances = squared.T.sqrt().reshape(-1, *grid)
        maps = m.smoother(distances, size=images.shape[-2:])
        return max_score(maps), maps
