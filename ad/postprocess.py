"""Turn raw, feature-resolution anomaly maps into image-resolution maps and image scores."""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F
from torch import nn


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering ±4σ, the size anomalib and scipy's gaussian_filter use (33 for σ=4)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


class MapSmoother(nn.Module):
    """Bilinear upsampling to the input size, then a Gaussian blur (kornia, reflect borders)."""

    def __init__(self, sigma: float = 4.0, align_corners: bool = False) -> None:
        super().__init__()
        self.sigma, self.align_corners = float(sigma), align_corners

    def forward(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, h, w) raw maps -> (B, H, W) smoothed maps at the image size."""
        x = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=self.align_corners)
        if self.sigma > 0:
            k = blur_kernel_size(self.sigma)
            x = kornia.filters.gaussian_blur2d(x, (k, k), (self.sigma, self.sigma), border_type="reflect")
        return x.squeeze(1)


def max_score(maps: torch.Tensor) -> torch.Tensor:
    """Image score as the maximum of its anomaly map, the convention of PaDiM and most map methods."""
    return maps.flatten(1).amax(dim=1)
