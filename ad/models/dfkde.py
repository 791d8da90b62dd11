"""DFKDE: Gaussian kernel density estimation on pooled deep features (anomalib's DFKDE).

Each image becomes one vector: its backbone feature maps (resnet18 ``layer4``) average-pooled to
1×1 and concatenated. At most ``max_training_points`` training vectors (a seeded random subset)
are projected by PCA to ``n_pca_components`` dimensions and scaled, either by the largest L2 norm
seen in training (``scale``) or to unit length (``norm``). A Gaussian KDE with Scott's bandwidth
and full covariance (as ``scipy.stats.gaussian_kde``) models them; an image's log density ``ℓ``
becomes anomalib's anomaly probability ``1 / (1 + exp(0.05·(ℓ − 12)))``. Image-level only.

PCA (``ad.ops.pca``, float64) and the KDE (``ad.ops.kde``) run in torch on the features' device.
Unlike anomalib, the log density is a ``logsumexp`` (anomalib's ``log(mean(exp) + 1e-300)``
underflows to ``-inf`` in float32 and ties every far-away image at probability 1), and ``norm``
scaling does not shift the KDE's training points by their mean (anomalib centres them in place
while computing the covariance).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ad.backbone import BackboneSpec, FeatureExtractor
from ad.errors import ADError
from ad.models.base import AnomalyModel, Prediction
from ad.ops.kde import KDE, fit_kde, kde_log_density
from ad.ops.pca import fit_pca

SCALING_METHODS = ("scale", "norm")


def random_subset(features: torch.Tensor, max_points: int, seed: int) -> torch.Tensor:
    """At most ``max_points`` rows of (N, D) features: a random subset that depends only on the seed."""
    if features.shape[0] <= max_points:
        return features
    keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
    return features[keep.sort().values.to(features.device)]


def anomaly_probability(log_density: torch.Tensor) -> torch.Tensor:
    """anomalib's mapping of a log density to an anomaly probability: 1 / (1 + exp(0.05·(ℓ − 12)))."""
    return torch.sigmoid(-0.05 * (log_density - 12))


class Dfkde(AnomalyModel):
    """DFKDE anomaly detector (see module docstring)."""

    produces_maps = False

    def __init__(
        self,
        backbone: BackboneSpec,
        layers: tuple[str, ...] = ("layer4",),
        n_pca_components: int = 16,
        feature_scaling_method: str = "scale",
        max_training_points: int = 40000,
        seed: int = 42,
    ) -> None:
        super().__init__()
        backbone = BackboneSpec.of(backbone)
        if feature_scaling_method not in SCALING_METHODS:
            raise ADError(
                f"model.feature_scaling_method: '{feature_scaling_method}' is not one of {', '.join(SCALING_METHODS)}"
            )
        if n_pca_components < 1:
            raise ADError(f"model.n_pca_components: {n_pca_components} must be at least 1")
        if max_training_points <= n_pca_components:
            raise ADError(
                f"model.max_training_points: {max_training_points} must exceed "
                f"model.n_pca_components ({n_pca_components}) for a full-rank KDE covariance"
            )
        self.extractor = FeatureExtractor.from_spec(backbone, list(layers))
        if n_pca_components > (dim := sum(self.extractor.channels)):
            raise ADError(f"model.n_pca_components: {n_pca_components} exceeds the {dim} feature channels of {layers}")
        self.n_pca_components, self.scaling = n_pca_components, feature_scaling_method
        self.max_training_points, self.seed = max_training_points, seed
        for name in ("mean", "components", "max_length", "whiten", "points", "log_norm"):
            self.register_buffer(name, torch.empty(0))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, D) features: each layer pooled to 1×1, concatenated along channels."""
        return torch.cat([F.adaptive_avg_pool2d(f, 1).flatten(1) for f in self.extractor(images)], dim=1)

    def pca(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (B, n_pca_components) PCA coordinates in float64."""
        return (features.double() - self.mean) @ self.components

    def rescale(self, z: torch.Tensor) -> torch.Tensor:
        """Divide PCA coordinates by the largest training norm (``scale``) or by their own (``norm``)."""
        return z / (self.max_length if self.scaling == "scale" else z.norm(dim=1, keepdim=True))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (B, n_pca_components) scaled PCA coordinates: what the KDE sees."""
        return self.rescale(self.pca(features))

    @torch.no_grad()
    def fit(self, batches: Iterable[dict], device: torch.device) -> None:
        """Pool every training image, then fit PCA, the scaling and the KDE on (a subset of) them."""
        features = torch.cat([self.embed(batch["image"].to(device)) for batch in batches])
        features = random_subset(features, self.max_training_points, self.seed)
        n, k = features.shape[0], self.n_pca_components
        if n <= k:
            raise ADError(
                f"dataset: DFKDE needs more training images than model.n_pca_components ({k}), got {n}; "
                f"add images or lower model.n_pca_components"
            )
        try:  # rows spanning fewer than k dimensions, or a singular KDE covariance
            self.mean, self.components, _ = fit_pca(features, n_components=k)
            if self.components.shape[1] < k:
                raise ValueError("rank below n_pca_components")
            z = self.pca(features)
            self.max_length = z.norm(dim=1).max()
            self.whiten, self.points, self.log_norm = fit_kde(self.rescale(z))
        except (ValueError, torch.linalg.LinAlgError):
            raise ADError(
                f"model.n_pca_components: the {k} PCA features of the {n} training images are degenerate "
                f"(singular covariance); lower model.n_pca_components or add images"
            ) from None

    def log_density(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B,) KDE log density of their scaled PCA features."""
        return kde_log_density(self.project(self.embed(images)), KDE(self.whiten, self.points, self.log_norm))

    def forward(self, images: torch.Tensor) -> Prediction:
        if self.points.numel() == 0:
            raise RuntimeError("Dfkde.forward called before fit")
        return Prediction(scores=anomaly_probability(self.log_density(images)).float())
