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

PCA is written in torch, in float64 like anomalib's SVD: it runs on the features' device and
leaves only plain tensors in the pickled model (no scikit-learn object). As N (images) is small
next to D (16,384 at 256 px), the axes come from the eigenvectors of the N×N Gram matrix rather
than a thin SVD: same result, several times faster on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ad.backbone import FeatureExtractor
from ad.errors import ADError
from ad.models.base import AnomalyModel, Prediction
from ad.postprocess import MapSmoother

SCORE_TYPES = ("fre", "nll")


def component_count(singular_values: torch.Tensor, level: float) -> int:
    """Components kept for a variance level, anomalib's way: the first index where the cumulative
    variance ratio reaches ``level`` (one fewer than scikit-learn), at least 1 and at most the rank."""
    variance = singular_values.double().square()
    ratios = variance.cumsum(0) / variance.sum()
    rank = int((singular_values > singular_values[0] * 1e-6).sum())
    return min(max(int((ratios < level).sum()), 1), rank)


def principal_axes(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors (D, r) of a centred (N, D) float64 matrix.

    Eigen-decomposes the smaller of the two Gram matrices: with N images ≪ D features that is the
    N×N one, several times faster than an SVD (which also costs ~0.5 s of LAPACK start-up on CPU).
    """
    n, d = centred.shape
    eigenvalues, vectors = torch.linalg.eigh(centred @ centred.T if n <= d else centred.T @ centred)
    singular_values, vectors = eigenvalues.flip(0).clamp_min(0).sqrt(), vectors.flip(1)
    if n > d:
        return singular_values, vectors
    r = int((singular_values > singular_values[0] * 1e-6).sum())  # V = XᵀU/σ needs σ > 0
    return singular_values, centred.T @ vectors[:, :r] / singular_values[:r]


def fit_pca(features: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, D) features -> mean (D,), components (D, k) and singular values (k,), computed in float64."""
    features = features.double()
    mean = features.mean(0)
    singular_values, axes = principal_axes(features - mean)
    if singular_values[0] == 0:
        raise ADError(f"dataset: all {len(features)} training images have the same features; PCA needs variety")
    k = component_count(singular_values, level)
    return mean.float(), axes[:, :k].float().contiguous(), singular_values[:k].float()


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
        backbone: dict,
        layer: str = "layer3",
        pooling_kernel_size: int = 4,
        pca_level: float = 0.97,
        score_type: str = "fre",
        blur_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 < pca_level <= 1:
            raise ADError(f"model.pca_level: {pca_level} is outside (0, 1]; it is the fraction of variance PCA keeps")
        if score_type not in SCORE_TYPES:
            raise ADError(f"model.score_type: '{score_type}' is not one of {', '.join(SCORE_TYPES)}")
        if pooling_kernel_size < 1:
            raise ADError(f"model.pooling_kernel_size: {pooling_kernel_size} must be at least 1")
        try:
            self.extractor = FeatureExtractor(layers=[layer], **backbone)
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
        self.mean, self.components, self.singular_values = fit_pca(features, self.pca_level)
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
