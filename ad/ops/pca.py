"""Principal component analysis in float64 torch, as DFM and DFKDE fit it.

Written in torch rather than scikit-learn so it runs on the features' device and a fitted model
holds plain tensors. With N rows ≪ D features (DFM: tens of images, 16,384 features) the axes come
from the eigenvectors of the N×N Gram matrix rather than a thin SVD: the same result, several
times faster on CPU and GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PCA(NamedTuple):
    """A fitted PCA, float64: ``(x - mean) @ components`` are a row's coordinates."""

    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (D, k): orthonormal axes, by decreasing variance
    singular_values: torch.Tensor  # (k,)


def rank_of(singular_values: torch.Tensor) -> int:
    """How many singular values (descending) are not zero to working precision (above 1e-6 of the first)."""
    return int((singular_values > singular_values[0] * 1e-6).sum())


def component_count(singular_values: torch.Tensor, level: float) -> int:
    """Components kept for a variance level, anomalib's way: the first index where the cumulative
    variance ratio reaches ``level`` (one fewer than scikit-learn), at least 1 and at most the rank.

    Args:
        singular_values: (r,) descending.
        level: share of the variance to keep, in (0, 1].
    """
    if not 0 < level <= 1:
        raise ValueError(f"component_count: level {level} is outside (0, 1]")
    variance = singular_values.double().square()
    ratios = variance.cumsum(0) / variance.sum()
    return min(max(int((ratios < level).sum()), 1), rank_of(singular_values))


def principal_axes(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and right singular vectors of a centred matrix, from the smaller Gram matrix.

    Args:
        centred: (N, D) float64 rows with zero mean.

    Returns:
        (min(N, D),) singular values, descending, and (D, r) right singular vectors: r = D when
        N > D, else the rank (V = XᵀU/σ needs σ > 0).
    """
    n, d = centred.shape
    eigenvalues, vectors = torch.linalg.eigh(centred @ centred.T if n <= d else centred.T @ centred)
    singular_values, vectors = eigenvalues.flip(0).clamp_min(0).sqrt(), vectors.flip(1)
    if n > d:
        return singular_values, vectors
    r = rank_of(singular_values)
    return singular_values, centred.T @ vectors[:, :r] / singular_values[:r]


def fit_pca(features: torch.Tensor, n_components: int | None = None, level: float | None = None) -> PCA:
    """PCA of the rows in float64, keeping ``n_components`` axes or enough for a ``level`` of the variance.

    Args:
        features: (N, D) rows, N >= 2.
        n_components: axes to keep; fewer come back when the rows' rank is lower.
        level: instead, the share of the variance to keep (``component_count``).

    Returns:
        The ``PCA``: mean (D,), components (D, k), singular values (k,).
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"fit_pca: needs (N>=2, D) rows, got {tuple(features.shape)}")
    if (n_components is None) == (level is None):
        raise ValueError("fit_pca: give n_components or level, not both")
    if n_components is not None and n_components < 1:
        raise ValueError(f"fit_pca: n_components {n_components} must be at least 1")
    features = features.double()
    mean = features.mean(0)
    singular_values, axes = principal_axes(features - mean)
    if singular_values[0] == 0:
        raise ValueError(f"fit_pca: all {len(features)} rows are equal; PCA needs variety")
    k = component_count(singular_values, level) if level is not None else min(n_components, rank_of(singular_values))
    return PCA(mean, axes[:, :k].contiguous(), singular_values[:k])
