"""PaDiM: a Gaussian per patch position over pretrained CNN features (Defard et al., ICPR 2020).

Features of layer1-3 are upsampled to layer1's grid and concatenated; a fixed random subset of
channels is kept; each position gets a mean and a covariance (+0.01·I). At test time the anomaly
map is the Mahalanobis distance per position, upsampled to the image and blurred (σ=4); the image
score is the map's maximum. Matches anomalib's PaDiM, vectorised over positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ad.backbone import FeatureExtractor
from ad.errors import ADError
from ad.models.base import AnomalyModel, Prediction
from ad.postprocess import MapSmoother, max_score
from ad.threads import single_threaded

#: Channels kept by the paper for its two backbones; other backbones must set model.n_features.
PAPER_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
#: Covariance regularisers: the paper's 0.01·I, plus anomalib's 1e-5·I before inversion.
COV_EPS = 0.01
INV_EPS = 1e-5


class Padim(AnomalyModel):
    """PaDiM anomaly detector (see module docstring)."""

    def __init__(
        self,
        backbone: dict,
        layers: tuple[str, ...] = ("layer1", "layer2", "layer3"),
        n_features: int | None = None,
        blur_sigma: float = 4.0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(layers=list(layers), **backbone)
        total = sum(self.extractor.channels)
        n_features = n_features or PAPER_N_FEATURES.get(self.extractor.name)
        if n_features is None:
            raise ADError(
                f"model.n_features: PaDiM has no paper default for backbone {self.extractor.name}; "
                f"set model.n_features (1..{total})"
            )
        if not 0 < n_features <= total:
            raise ADError(f"model.n_features: {n_features} is outside 1..{total} (channels of {list(layers)})")
        generator = torch.Generator().manual_seed(seed)
        # Sorted, so per-layer selection equals "concatenate, then index" (Mahalanobis ignores order).
        chosen = torch.randperm(total, generator=generator)[:n_features].sort().values
        self.register_buffer("channel_idx", chosen)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_cov", torch.empty(0))
        self.smoother = MapSmoother(sigma=blur_sigma)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, P, C) patch embeddings on the first layer's grid."""
        features = self.extractor(images)
        grid = features[0].shape[-2:]
        parts, start = [], 0
        for feature in features:  # pick each layer's channels first: unused ones are never upsampled
            stop = start + feature.shape[1]
            keep = self.channel_idx[(self.channel_idx >= start) & (self.channel_idx < stop)] - start
            part = feature[:, keep]
            parts.append(part if part.shape[-2:] == grid else F.interpolate(part, size=grid, mode="nearest"))
            start = stop
        return torch.cat(parts, dim=1).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def fit(self, batches: Iterable[dict], device: torch.device) -> None:
        """Streaming mean and covariance per position: memory is one (P, C, C) accumulator."""
        count, shift, s1, s2 = 0, None, None, None
        for batch in batches:
            x = self.embed(batch["image"].to(device))
            if shift is None:  # shifting by a first estimate keeps the fp32 sums well conditioned
                shift = x.mean(0)
                s1 = torch.zeros_like(shift)
                s2 = x.new_zeros(shift.shape + shift.shape[-1:])
            d = (x - shift).transpose(0, 1).contiguous()  # (P, B, C): one GEMM per position, no copies
            s1 += d.sum(1)
            torch.baddbmm(s2, d.transpose(1, 2), d, out=s2)  # accumulate in place: no (P, C, C) temporary
            count += x.shape[0]
        if count < 2:
            raise ADError(f"dataset: PaDiM needs at least 2 training images, got {count}")
        mean_d = s1 / count
        # cov = (S2 - n·m·mᵀ) / (n - 1), fused and in place: the (P, C, C) buffer is the big one
        cov = torch.baddbmm(s2, mean_d.unsqueeze(-1), mean_d.unsqueeze(-2), beta=1 / (count - 1),
                            alpha=-count / (count - 1), out=s2)
        cov.diagonal(dim1=-2, dim2=-1).add_(COV_EPS + INV_EPS)
        with single_threaded(cov.device):
            for start in range(0, cov.shape[0], 512):  # in place, chunked: bounded extra memory
                chunk = cov[start:start + 512]  # symmetric positive definite: Cholesky is the fast, stable inverse
                cov[start:start + 512] = torch.cholesky_inverse(torch.linalg.cholesky(chunk))
        self.mean, self.inv_cov = shift + mean_d, cov

    def forward(self, images: torch.Tensor) -> Prediction:
        if self.inv_cov.numel() == 0:
            raise RuntimeError("Padim.forward called before fit")
        delta = (self.embed(images) - self.mean).transpose(0, 1).contiguous()  # (P, B, C)
        squared = (torch.bmm(delta, self.inv_cov) * delta).sum(-1).T  # (B, P)
        h, w = (s // self.extractor.reductions[0] for s in images.shape[-2:])
        distances = squared.clamp_min(0).sqrt().reshape(-1, h, w)
        maps = self.smoother(distances, size=images.shape[-2:])
        return Prediction(scores=max_score(maps), maps=maps)
