"""DFM: deep feature modelling with PCA and a Gaussian (Ahuja et al., arXiv 1909.11786).

One layer's feature map (resnet50 ``layer3``) is average-pooled with a 4×4 kernel and flattened
per image; PCA keeps the leading components that explain ``pca_level`` of the variance. The score
is either the feature reconstruction error ``fre`` (squared distance to the PCA subspace) or the
negative log-likelihood ``nll`` of a Gaussian fitted in PCA space (centred once: anomalib 2.7
subtracts the mean twice, in place in its PCA and again in its transform, so its Gaussian sits at
−mean·V and scores differ; with that shift undone they agree to 3e-7). With ``fre`` the residual,
summed over channels per pooled cell, is the anomaly map, upsampled bilinearly to the image (not
blurred, as in anomalib; ``blur_sigma`` > 0 adds a Gaussian blur); the image score is its sum, as in
anomalib. ``nll`` is image-level only (no map), as in anomalib.

PCA (``ad.ops.pca``) runs in float64 like anomalib's SVD.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ad.backbone import BackboneSpec, FeatureExtractor
from ad.errors import ADError
from ad.models.base import AnomalyModel, Prediction
from ad.ops.pca import fit_pca
from ad.postprocess import MapSmoother

SCORE_TYPES = ("fre", "nll")


def fit_gaussian(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, whitening matrix U/σ and log-determinant of a Gaussian over (N, k) points, via SVD."""
    z = z.double()
    mean = z.mean(0)
    u, sigma, _ = torch.linalg.svd((z - mean).T / z.shape[0] ** 0.5, full_matrices=False)
    return mean.float(), (u / sigma).float(), 2 * sigma.log().sum().float()


class Dfm(AnomalyModel):
    """DFM anomaly detector (see module docstring)."""

    def __init__(
        self,
        backbone: BackboneSpec,
        layer: str = "layer3",
        pooling_kernel_size: int = 4,
        pca_level: float = 0.97,
        score_type: str = "fre",
        blur_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        backbone = BackboneSpec.of(backbone)
        if not 0 < pca_level <= 1:
            raise ADError(f"model.pca_level: {pca_level} is outside (0, 1]; it is the fraction of variance PCA keeps")
        if score_type not in SCORE_TYPES:
            raise ADError(f"model.score_type: '{score_type}' is not one of {', '.join(SCORE_TYPES)}")
        if pooling_kernel_size < 1:
            raise ADError(f"model.pooling_kernel_size: {pooling_kernel_size} must be at least 1")
        try:
            self.extractor = FeatureExtractor.from_spec(backbone, [layer])
        except ADError as exc:  # the extractor names the list key; DFM's key is the single model.layer
            raise ADError(str(exc).replace("model.layers:", "model.layer:", 1)) from None
        self.pooling_kernel_size, self.pca_level, self.score_type = pooling_kernel_size, pca_level, score_type
        self.produces_maps = score_type == "fre"
        self.smoother = MapSmoother(sigma=blur_sigma)
        for name in ("mean", "components", "singular_values", "gauss_mean", "whiten", "log_det"):
            self.register_buffer(name, torch.empty(0))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, C, h, w) average-pooled feature maps."""
        features, k = self.extractor(images)[0], self.pooling_kernel_size
        if k == 1:
            return features
        if min(grid := tuple(features.shape[-2:])) < k:
            raise ADError(
                f"model.pooling_kernel_size: {k} is larger than the {grid} feature map of {self.extractor.layers[0]} "
                f"at image size {tuple(images.shape[-2:])}; lower it or use larger images"
            )
        return F.avg_pool2d(features, kernel_size=k)

    @torch.no_grad()
    def fit(self, batches: Iterable[dict], device: torch.device) -> None:
        """Stack the pooled features of all training images, then fit PCA (and the Gaussian for nll)."""
        features = torch.cat([self.embed(batch["image"].to(device)).flatten(1) for batch in batches])
        if features.shape[0] < 2:
            raise ADError(f"dataset: DFM needs at least 2 training images, got {features.shape[0]}")
        try:
            pca = fit_pca(features, level=self.pca_level)
        except ValueError:
            raise ADError(
                f"dataset: all {len(features)} training images have the same features; PCA needs variety"
            ) from None
        self.mean, self.components, self.singular_values = (t.float() for t in pca)
        if self.score_type == "nll":
            self.gauss_mean, self.whiten, self.log_det = fit_gaussian((features - self.mean) @ self.components)

    def reconstruction_error(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B, h, w) squared distance to the PCA subspace, summed over channels."""
        centred = features.flatten(1) - self.mean
        residual = centred - (centred @ self.components) @ self.components.T
        return residual.square().view_as(features).sum(1)

    def negative_log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B,) anomalib's NLL: ‖(z − μ)U/σ‖² + 2·Σ log σ in PCA space."""
        z = (features.flatten(1) - self.mean) @ self.components
        return ((z - self.gauss_mean) @ self.whiten).square().sum(1) + self.log_det

    def forward(self, images: torch.Tensor) -> Prediction:
        if self.components.numel() == 0:
            raise RuntimeError("Dfm.forward called before fit")
        features = self.embed(images)
        if self.score_type == "nll":
            return Prediction(scores=self.negative_log_likelihood(features))
        error = self.reconstruction_error(features)
        return Prediction(scores=error.flatten(1).sum(1), maps=self.smoother(error, size=images.shape[-2:]))
