"""Gaussians per position and their Mahalanobis distances: PaDiM's block form, and the plain full-covariance reference.

Block form: the last K of C = F + K dimensions are shared by groups ("cells") of positions, as when
a coarse layer is upsampled by nearest neighbour, so their covariance block D is the same for every
position of a cell. Each Gaussian is kept as Σ = [[A, B], [Bᵀ, D]] with D stored once per cell, and
the Mahalanobis distance is split exactly along the Schur complement S = A - B D⁻¹ Bᵀ:

    (x-μ)ᵀ Σ⁻¹ (x-μ) = ‖W_S (f - G c)‖² + ‖W_D c‖²,  G = B D⁻¹,  W_Sᵀ W_S = S⁻¹,  W_Dᵀ W_D = D⁻¹,

where f and c are the first F and last K dimensions of x - μ. The covariance sums are smaller and
the inversions several times cheaper than for full C×C matrices at every position.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ad.threads import map_on_cores, single_threaded


def inverse_cholesky_(matrices: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Replace each symmetric positive definite matrix Σ of a batch, in place, by W = L⁻¹, where Σ = LLᵀ.

    Σ⁻¹ = WᵀW, so the Mahalanobis distance is ‖W(x − μ)‖, and one triangular solve replaces
    inverting the whole matrix (less work than Cholesky plus ``cholesky_inverse``). On CPU, LAPACK
    factorises one small matrix at a time on one thread, so chunks of the batch go to one worker
    thread per core (torch releases the GIL); chunking also bounds the extra memory.

    Args:
        matrices: (N, C, C) symmetric positive definite, overwritten.

    Returns:
        ``matrices``, now (N, C, C) lower-triangular W.
    """
    if matrices.ndim != 3 or matrices.shape[1] != matrices.shape[2]:
        raise ValueError(f"inverse_cholesky_: needs (N, C, C) matrices, got {tuple(matrices.shape)}")
    if matrices.shape[-1] == 0 or matrices.shape[0] == 0:
        return matrices

    def invert(start: int) -> None:
        block = matrices[start:start + chunk]
        identity = torch.eye(block.shape[-1], dtype=block.dtype, device=block.device).expand_as(block)
        block.copy_(torch.linalg.solve_triangular(torch.linalg.cholesky(block), identity, upper=False))

    starts = range(0, matrices.shape[0], chunk)
    if matrices.device.type != "cpu":
        for start in starts:
            invert(start)
        return matrices
    workers = torch.get_num_threads()
    with single_threaded(matrices.device):
        map_on_cores(invert, starts, workers, name="ad-invert")
    return matrices


def covariance_(sums: torch.Tensor, mean_rows: torch.Tensor, mean_cols: torch.Tensor, count: int) -> torch.Tensor:
    """Turn streamed sums of outer products Σ d dᵀ into sample covariances, in place: (S - n·m_r·m_cᵀ) / (n - 1).

    Args:
        sums: (N, R, K) sums of outer products, overwritten.
        mean_rows: (N, R) and ``mean_cols`` (N, K): the means of the block's row and column dimensions.
        count: samples summed, at least 2.
    """
    return torch.baddbmm(sums, mean_rows[:, :, None], mean_cols[:, None, :], beta=1 / (count - 1),
                         alpha=-count / (count - 1), out=sums)


def couple(b: torch.Tensor, d_inv: torch.Tensor, cell_of: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """G = B D⁻¹ for every position, gathering each chunk's D⁻¹ only (bounded memory).

    Args:
        b: (P, F, K) off-diagonal blocks.
        d_inv: (cells, K, K) inverse of the shared block.
        cell_of: (P,) each position's cell.

    Returns:
        (P, F, K) G.
    """
    coupling = torch.empty_like(b)
    for start in range(0, b.shape[0], chunk):
        stop = start + chunk
        torch.bmm(b[start:stop], d_inv[cell_of[start:stop]], out=coupling[start:stop])
    return coupling


class BlockGaussians(NamedTuple):
    """P Gaussians in block form (module docstring): μ, W_S, G per position; W_D per cell."""

    mean: torch.Tensor  # (P, C)
    whitening_fine: torch.Tensor  # (P, F, F): W_S
    coupling: torch.Tensor  # (P, F, K): G
    whitening_coarse: torch.Tensor  # (cells, K, K): W_D


class BlockGaussianSums:
    """Streaming sums for ``BlockGaussians``: one (P, F, C) and one (cells, K, K) accumulator.

    Args:
        n_fine: F, the leading dimensions that differ between the positions of a cell.
        cell_of: (P,) each position's cell.
        representative: (cells,) one position of each cell (its last K values stand for the cell's).
    """

    def __init__(self, n_fine: int, cell_of: torch.Tensor, representative: torch.Tensor) -> None:
        if cell_of.ndim != 1 or representative.ndim != 1 or n_fine < 0:
            raise ValueError("BlockGaussianSums: needs n_fine >= 0, cell_of (P,) and representative (cells,)")
        self.n_fine, self.cell_of, self.representative = n_fine, cell_of, representative
        self.count, self.shift = 0, None

    def add(self, x: torch.Tensor) -> None:
        """Add a batch: ``x`` (P, B, C) samples per position, overwritten."""
        if x.ndim != 3 or x.shape[0] != len(self.cell_of) or x.shape[2] < self.n_fine:
            raise ValueError(f"BlockGaussianSums.add: needs (P={len(self.cell_of)}, B, C>={self.n_fine}) samples, "
                             f"got {tuple(x.shape)}")
        f = self.n_fine
        if self.shift is None:  # shifting by a first estimate keeps the fp32 sums well conditioned
            self.shift = x.mean(1, keepdim=True)
            self.s1 = torch.zeros_like(self.shift[:, 0])
            self.s2_rows = x.new_zeros(x.shape[0], f, x.shape[2])
            self.s2_coarse = x.new_zeros(len(self.representative), x.shape[2] - f, x.shape[2] - f)
        d = x.sub_(self.shift)
        self.s1 += d.sum(1)
        # in place: no temporary of the accumulators' size
        torch.baddbmm(self.s2_rows, d[..., :f].transpose(1, 2), d, out=self.s2_rows)
        coarse = d[..., f:].index_select(0, self.representative)  # (cells, B, K): at the coarse resolution
        torch.baddbmm(self.s2_coarse, coarse.transpose(1, 2), coarse, out=self.s2_coarse)
        self.count += x.shape[1]

    def finish(self, ridge: float) -> BlockGaussians:
        """The Gaussians of the samples added, ``ridge``·I added to each covariance; consumes the sums."""
        if self.count < 2:
            raise ValueError(f"BlockGaussianSums.finish: needs at least 2 samples, got {self.count}")
        f, count = self.n_fine, self.count
        mean_d = self.s1 / count
        rows = covariance_(self.s2_rows, mean_d[:, :f], mean_d, count)  # (P, F, C): [A | B]
        mean_coarse = mean_d[self.representative, f:]
        coarse = covariance_(self.s2_coarse, mean_coarse, mean_coarse, count)  # (cells, K, K): D
        a, b = rows[..., :f], rows[..., f:]
        for block in (a, coarse):  # the diagonal blocks of Σ take the regulariser
            block.diagonal(dim1=-2, dim2=-1).add_(ridge)
        whitening_coarse = inverse_cholesky_(coarse)
        coupling = couple(b, whitening_coarse.transpose(1, 2) @ whitening_coarse, self.cell_of)  # G = B D⁻¹
        schur = torch.baddbmm(a, coupling, b.transpose(1, 2), alpha=-1)  # S = A - G Bᵀ
        return BlockGaussians(self.shift[:, 0] + mean_d, inverse_cholesky_(schur), coupling, whitening_coarse)


def block_mahalanobis(delta: torch.Tensor, gaussians: BlockGaussians, cell_of: torch.Tensor,
                      representative: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances to block-form Gaussians.

    Args:
        delta: (P, B, C) samples minus their position's mean.
        gaussians: the P Gaussians (their means unused).
        cell_of: (P,) each position's cell; ``representative``: (cells,) one position of each.

    Returns:
        (P, B) squared distances.
    """
    f = gaussians.whitening_fine.shape[-1]
    if delta.ndim != 3 or delta.shape[0] != gaussians.coupling.shape[0] or delta.shape[2] != f + \
            gaussians.whitening_coarse.shape[-1]:
        raise ValueError(f"block_mahalanobis: delta {tuple(delta.shape)} does not fit Gaussians of "
                         f"{gaussians.coupling.shape[0]} positions")
    fine, coarse = delta[..., :f], delta[..., f:]
    residual = torch.baddbmm(fine, coarse, gaussians.coupling.transpose(1, 2), alpha=-1)  # f - G c, row-wise
    squared = torch.bmm(residual, gaussians.whitening_fine.transpose(1, 2)).square_().sum(-1)  # (P, B)
    per_cell = torch.bmm(coarse.index_select(0, representative), gaussians.whitening_coarse.transpose(1, 2))
    squared += per_cell.square_().sum(-1)[cell_of]
    return squared


def block_precision(whitening_fine: torch.Tensor, coupling: torch.Tensor,
                    whitening_coarse: torch.Tensor) -> torch.Tensor:
    """Σ⁻¹ = [[S⁻¹, -S⁻¹G], [-GᵀS⁻¹, D⁻¹ + GᵀS⁻¹G]] of block-form Gaussians, for inspection and tests.

    Args:
        whitening_fine: (N, F, F) W_S; ``coupling``: (N, F, K) G; ``whitening_coarse``: (N, K, K) W_D.

    Returns:
        (N, C, C) precision matrices.
    """
    s_inv = whitening_fine.transpose(1, 2) @ whitening_fine
    top_right = -s_inv @ coupling
    bottom_right = whitening_coarse.transpose(1, 2) @ whitening_coarse - coupling.transpose(1, 2) @ top_right
    return torch.cat([torch.cat([s_inv, top_right], 2), torch.cat([top_right.transpose(1, 2), bottom_right], 2)], 1)


def gaussian_fit(samples: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference: mean and inverse of the full sample covariance (+ ``ridge``·I) per position.

    Args:
        samples: (P, N, C) samples per position, N >= 2.

    Returns:
        (P, C) means and (P, C, C) precision matrices.
    """
    if samples.ndim != 3 or samples.shape[1] < 2:
        raise ValueError(f"gaussian_fit: needs (P, N>=2, C) samples, got {tuple(samples.shape)}")
    mean = samples.mean(1)
    centred = samples - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / (samples.shape[1] - 1)
    cov.diagonal(dim1=-2, dim2=-1).add_(ridge)
    return mean, torch.linalg.inv(cov)


def mahalanobis(samples: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Plain reference: squared Mahalanobis distances (x-μ)ᵀ Σ⁻¹ (x-μ).

    Args:
        samples: (P, B, C); ``mean``: (P, C); ``precision``: (P, C, C).

    Returns:
        (P, B) squared distances.
    """
    if samples.ndim != 3 or mean.shape != (samples.shape[0], samples.shape[2]):
        raise ValueError(f"mahalanobis: samples {tuple(samples.shape)} and mean {tuple(mean.shape)} do not fit")
    delta = samples - mean[:, None]
    return torch.einsum("pbi,pij,pbj->pb", delta, precision, delta)
