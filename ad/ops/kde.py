"""Gaussian kernel density estimation with Scott's bandwidth and full covariance, as ``scipy.stats.gaussian_kde``.

Written in torch (a few lines) so it runs on the features' device and a fitted model holds plain
tensors; the log density is a ``logsumexp``, so far-away points do not underflow to ``-inf``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class KDE(NamedTuple):
    """A fitted KDE: kernel exp(-‖(x − p)L‖²/2)·det(L)/(2π)^(d/2) around each whitened point pL."""

    whiten: torch.Tensor  # (d, d): L, the Cholesky factor of the kernel's inverse covariance
    points: torch.Tensor  # (N, d): the training points, whitened
    log_norm: torch.Tensor  # (): log det(L) - d/2 log 2π


def fit_kde(points: torch.Tensor) -> KDE:
    """Scott's-rule Gaussian KDE: kernel covariance = cov(points)·factor², factor = N^(-1/(d+4)).

    Args:
        points: (N, d) training points, N > d for a full-rank covariance.

    Raises:
        torch.linalg.LinAlgError: when the points' covariance is singular.
    """
    if points.ndim != 2 or points.shape[0] < 2:
        raise ValueError(f"fit_kde: needs (N>=2, d) points, got {tuple(points.shape)}")
    n, d = points.shape
    factor = n ** (-1.0 / (d + 4))
    inv_cov = torch.linalg.inv(torch.cov(points.T)) / factor**2
    whiten = torch.linalg.cholesky(inv_cov)
    log_norm = whiten.diagonal().log().sum() - 0.5 * d * math.log(2 * math.pi)
    return KDE(whiten, points @ whiten, log_norm)


def kde_log_density(x: torch.Tensor, kde: KDE) -> torch.Tensor:
    """Log of the mean Gaussian kernel over the training points.

    Args:
        x: (B, d) queries.

    Returns:
        (B,) log densities.
    """
    if x.ndim != 2 or x.shape[1] != kde.whiten.shape[0]:
        raise ValueError(f"kde_log_density: needs (B, {kde.whiten.shape[0]}) queries, got {tuple(x.shape)}")
    y = x @ kde.whiten
    sq = (y.square().sum(1, keepdim=True) + kde.points.square().sum(1) - 2 * y @ kde.points.T).clamp_min(0)
    return torch.logsumexp(-0.5 * sq, dim=1) - math.log(kde.points.shape[0]) + kde.log_norm
