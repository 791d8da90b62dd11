"""PaDiM: a Gaussian per patch position over pretrained CNN features (Defard et al., ICPR 2020).

Features of layer1-3 are upsampled to layer1's grid and concatenated; a fixed random subset of
channels is kept; each position gets a mean and a covariance (+0.01·I). At test time the anomaly
map is the Mahalanobis distance per position, upsampled to the image and blurred (σ=4); the image
score is the map's maximum. Matches anomalib's PaDiM, vectorised over positions.

The statistics use the structure nearest upsampling gives the embedding: the last layer's channels
at a position are copies of one cell of that layer's coarser grid (a 4x4 block of positions for
layer3 of a ResNet), so each Gaussian is kept in the block form of ``ad.ops.gaussian``, that
layer's covariance block stored once per cell: the same distances, with covariance sums less than
half as large and inversions several times cheaper.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ad.backbone import BackboneSpec, FeatureExtractor
from ad.errors import ADError
from ad.models.base import AnomalyModel, Prediction
from ad.ops.gaussian import BlockGaussians, BlockGaussianSums, block_mahalanobis, block_precision
from ad.ops.upsample import nearest_index, pick_channels, upsample_nearest_into
from ad.postprocess import MapSmoother, max_score

#: Channels kept by the paper for its two backbones; other backbones must set model.n_features.
PAPER_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
#: Covariance regularisers: the paper's 0.01·I, plus anomalib's 1e-5·I before inversion.
COV_EPS = 0.01
INV_EPS = 1e-5


class Padim(AnomalyModel):
    """PaDiM anomaly detector (see module docstring)."""

    def __init__(
        self,
        backbone: BackboneSpec,
        layers: tuple[str, ...] = ("layer1", "layer2", "layer3"),
        n_features: int | None = None,
        blur_sigma: float = 4.0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        backbone = BackboneSpec.of(backbone)
        self.extractor = FeatureExtractor.from_spec(backbone, list(layers))
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
        self.register_buffer("mean", torch.empty(0))  # (P, C) per position
        # Block form of each position's inverse covariance (module docstring): W_S per position,
        # G per position, W_D per cell of the last layer's grid, and which cell each position reads.
        self.register_buffer("whitening_fine", torch.empty(0))  # (P, F, F)
        self.register_buffer("coupling", torch.empty(0))  # (P, F, K): G = B D⁻¹
        self.register_buffer("whitening_coarse", torch.empty(0))  # (cells, K, K)
        self.register_buffer("cell_of", torch.empty(0, dtype=torch.long))  # (P,)
        self.register_buffer("representative", torch.empty(0, dtype=torch.long))  # (cells,): a position of each
        self.smoother = MapSmoother(sigma=blur_sigma)

    @property
    def n_fine(self) -> int:
        """How many kept channels come from layers before the last one (they lead: channels are sorted)."""
        return int((self.channel_idx < sum(self.extractor.channels[:-1])).sum())

    def resolved_settings(self) -> dict:
        return {"n_features": len(self.channel_idx)}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (P, B, C) fp32 patch embeddings on the first layer's grid, position-major.

        Position-major is what the per-position statistics consume: each position's (B, C) block is
        contiguous, so fit and test run batched GEMMs on it without another copy. Each layer's kept
        channels are picked from the backbone's own output (bf16 under autocast) and written straight
        into that layout, upsampled and converted to fp32 by the same copy.
        """
        return self._embed(self.extractor(images, fp32=False))

    def _embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``embed`` of the backbone's feature maps."""
        (b, _, h, w), device = features[0].shape, features[0].device
        out = torch.empty(h, w, b, len(self.channel_idx), device=device)
        start = column = 0
        for feature in features:
            stop = start + feature.shape[1]
            keep = self.channel_idx[(self.channel_idx >= start) & (self.channel_idx < stop)] - start
            upsample_nearest_into(out[..., column:column + len(keep)], pick_channels(feature, keep))
            start, column = stop, column + len(keep)
        return out.view(h * w, b, -1)

    def _set_cells(self, grid: torch.Size, last_grid: torch.Size, device: torch.device) -> None:
        """Number the cells of the last layer's grid that the positions read (``cell_of``) and pick one
        position of each (``representative``), from the sizes of the first and last layers' grids."""
        (h, w), (last_h, last_w) = grid, last_grid
        rows, cols = nearest_index(last_h, h, device), nearest_index(last_w, w, device)
        cells, cell_of = torch.unique((rows[:, None] * last_w + cols[None, :]).flatten(), return_inverse=True)
        positions = torch.arange(h * w, device=device)  # each cell's first position (its values are copies)
        representative = positions.new_full((len(cells),), h * w).scatter_reduce_(0, cell_of, positions, "amin")
        self.cell_of, self.representative = cell_of, representative

    @torch.no_grad()
    def fit(self, batches: Iterable[dict], device: torch.device) -> None:
        """Streaming sums per position (earlier layers' rows) and per cell (the last layer's block)."""
        sums = None
        for batch in batches:
            features = self.extractor(batch["image"].to(device), fp32=False)
            x = self._embed(features)  # (P, B, C)
            if sums is None:
                self._set_cells(features[0].shape[-2:], features[-1].shape[-2:], x.device)
                sums = BlockGaussianSums(self.n_fine, self.cell_of, self.representative)
            sums.add(x)
        if sums is None or sums.count < 2:
            raise ADError(f"dataset: PaDiM needs at least 2 training images, got {sums.count if sums else 0}")
        self.mean, self.whitening_fine, self.coupling, self.whitening_coarse = sums.finish(COV_EPS + INV_EPS)

    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, h, w) Mahalanobis distance of each patch to its position's Gaussian."""
        if self.mean.numel() == 0:
            raise RuntimeError("Padim.distances called before fit")
        features = self.extractor(images, fp32=False)
        delta = self._embed(features).sub_(self.mean.unsqueeze(1))  # (P, B, C)
        gaussians = BlockGaussians(self.mean, self.whitening_fine, self.coupling, self.whitening_coarse)
        squared = block_mahalanobis(delta, gaussians, self.cell_of, self.representative)
        return squared.T.sqrt_().reshape(-1, *features[0].shape[-2:])

    def precision(self, positions: torch.Tensor) -> torch.Tensor:
        """Σ⁻¹ of the Gaussians at ``positions`` (flat indices into the first layer's grid), (N, C, C).

        For inspection and tests; scoring never forms it.
        """
        return block_precision(self.whitening_fine[positions], self.coupling[positions],
                               self.whitening_coarse[self.cell_of[positions]])

    def forward(self, images: torch.Tensor) -> Prediction:
        maps = self.smoother(self.distances(images), size=images.shape[-2:])
        return Prediction(scores=max_score(maps), maps=maps)
