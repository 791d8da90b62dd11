"""PaDiM: a Gaussian per patch position over pretrained CNN features (Defard et al., ICPR 2020).

Features of layer1-3 are upsampled to layer1's grid and concatenated; a fixed random subset of
channels is kept; each position gets a mean and a covariance (+0.01·I). At test time the anomaly
map is the Mahalanobis distance per position, upsampled to the image and blurred (σ=4); the image
score is the map's maximum. Matches anomalib's PaDiM, vectorised over positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ad.backbone import FeatureExtractor
from ad.errors import ADError
from ad.models.base import AnomalyModel, Prediction
from ad.postprocess import MapSmoother, max_score
from ad.threads import map_on_cores, single_threaded

#: Channels kept by the paper for its two backbones; other backbones must set model.n_features.
PAPER_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
#: Covariance regularisers: the paper's 0.01·I, plus anomalib's 1e-5·I before inversion.
COV_EPS = 0.01
INV_EPS = 1e-5


def nearest_index(size_in: int, size_out: int, device: torch.device | None = None) -> torch.Tensor:
    """Source rows of nearest-neighbour resizing, exactly as ``F.interpolate(mode="nearest")`` picks them."""
    scale = torch.tensor(float(size_in), dtype=torch.float32, device=device) / size_out  # ATen's float32 scale
    rows = torch.arange(size_out, dtype=torch.float32, device=device) * scale
    return rows.floor().long().clamp_max(size_in - 1)


def pick_channels(feature: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature map -> its ``keep`` channels as an (h, w, B, kept) view, position-major.

    Channels-last maps are gathered as one (B*h*w, C) matrix, row by row: 5x faster than picking
    along the same dimension through the position-major view, whose strides defeat ATen's fast path.
    """
    b, c, h, w = feature.shape
    if feature.is_contiguous(memory_format=torch.channels_last):
        picked = feature.permute(0, 2, 3, 1).reshape(b * h * w, c).index_select(1, keep)
        return picked.view(b, h, w, len(keep)).permute(1, 2, 0, 3)
    return feature.index_select(1, keep).permute(2, 3, 0, 1)  # NCHW: whole channel planes


def upsample_nearest_into(out: torch.Tensor, part: torch.Tensor) -> None:
    """Copy ``part`` (h, w, ...) into ``out`` (H, W, ...), nearest-neighbour upsampled as ``F.interpolate``.

    An integer scale factor is a broadcast view of ``part`` (one copy, no index tensors); other sizes
    gather the rows and columns ``nearest_index`` picks.
    """
    (h, w), (big_h, big_w) = part.shape[:2], out.shape[:2]
    rows, cols = nearest_index(h, big_h, part.device), nearest_index(w, big_w, part.device)
    fh, fw = big_h // h, big_w // w
    if big_h == fh * h and big_w == fw * w and torch.equal(rows, _repeat_index(h, fh, rows.device)) \
            and torch.equal(cols, _repeat_index(w, fw, cols.device)):
        out.view(h, fh, w, fw, *out.shape[2:]).copy_(part[:, None, :, None])
    else:
        out.copy_(part[rows][:, cols])


def _repeat_index(size: int, factor: int, device: torch.device) -> torch.Tensor:
    """0, 0, 1, 1, ...: each of ``size`` rows repeated ``factor`` times."""
    return torch.arange(size, device=device).repeat_interleave(factor)


def inverse_cholesky_(matrices: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Replace each symmetric positive definite matrix Σ of a batch, in place, by W = L⁻¹, where Σ = LLᵀ.

    Σ⁻¹ = WᵀW, so the Mahalanobis distance is ‖W(x − μ)‖ at the cost of the full inverse's product,
    and one triangular solve replaces inverting the whole matrix: a quarter less work than Cholesky
    plus ``cholesky_inverse`` (0.56 against 0.76 s for 4096 matrices of 100², measured on one core).
    On CPU, LAPACK factorises one small matrix at a time on one thread, so chunks of the batch go to
    one worker thread per core (torch releases the GIL); chunking also bounds the extra memory.
    """

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
        self.register_buffer("whitening", torch.empty(0))  # per position: L⁻¹ of its covariance
        self.smoother = MapSmoother(sigma=blur_sigma)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (P, B, C) fp32 patch embeddings on the first layer's grid, position-major.

        Position-major is what the per-position statistics consume: each position's (B, C) block is
        contiguous, so fit and test run batched GEMMs on it without another copy. Each layer's kept
        channels are picked from the backbone's own output (bf16 under autocast) and written straight
        into that layout, upsampled and converted to fp32 by the same copy.
        """
        features = self.extractor(images, fp32=False)
        h, w = features[0].shape[-2:]
        out = torch.empty(h, w, images.shape[0], len(self.channel_idx), device=features[0].device)
        start = column = 0
        for feature in features:
            stop = start + feature.shape[1]
            keep = self.channel_idx[(self.channel_idx >= start) & (self.channel_idx < stop)] - start
            upsample_nearest_into(out[..., column:column + len(keep)], pick_channels(feature, keep))
            start, column = stop, column + len(keep)
        return out.view(h * w, images.shape[0], -1)

    @torch.no_grad()
    def fit(self, batches: Iterable[dict], device: torch.device) -> None:
        """Streaming mean and covariance per position: memory is one (P, C, C) accumulator."""
        count, shift, s1, s2 = 0, None, None, None
        for batch in batches:
            x = self.embed(batch["image"].to(device))  # (P, B, C)
            if shift is None:  # shifting by a first estimate keeps the fp32 sums well conditioned
                shift = x.mean(1, keepdim=True)
                s1 = torch.zeros_like(shift[:, 0])
                s2 = x.new_zeros(s1.shape + s1.shape[-1:])
            d = x.sub_(shift)
            s1 += d.sum(1)
            torch.baddbmm(s2, d.transpose(1, 2), d, out=s2)  # accumulate in place: no (P, C, C) temporary
            count += x.shape[1]
        if count < 2:
            raise ADError(f"dataset: PaDiM needs at least 2 training images, got {count}")
        mean_d = s1 / count
        # cov = (S2 - n·m·mᵀ) / (n - 1), fused and in place: the (P, C, C) buffer is the big one
        cov = torch.baddbmm(s2, mean_d.unsqueeze(-1), mean_d.unsqueeze(-2), beta=1 / (count - 1),
                            alpha=-count / (count - 1), out=s2)
        cov.diagonal(dim1=-2, dim2=-1).add_(COV_EPS + INV_EPS)
        self.mean, self.whitening = shift[:, 0] + mean_d, inverse_cholesky_(cov)

    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, h, w) Mahalanobis distance of each patch to its position's Gaussian."""
        if self.whitening.numel() == 0:
            raise RuntimeError("Padim.distances called before fit")
        delta = self.embed(images).sub_(self.mean.unsqueeze(1))  # (P, B, C)
        whitened = torch.bmm(delta, self.whitening.transpose(1, 2))  # row b: (W·delta_b)ᵀ
        h, w = (s // self.extractor.reductions[0] for s in images.shape[-2:])
        return whitened.square_().sum(-1).T.sqrt_().reshape(-1, h, w)

    def forward(self, images: torch.Tensor) -> Prediction:
        maps = self.smoother(self.distances(images), size=images.shape[-2:])
        return Prediction(scores=max_score(maps), maps=maps)
