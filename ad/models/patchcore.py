"""PatchCore: nearest-neighbour distance to a memory bank of nominal patches (Roth et al., CVPR 2022).

Features of layer2 and layer3 are averaged over 3x3 neighbourhoods, layer3 is upsampled to layer2's
grid and the two are concatenated into one vector per patch. All training patches form the memory
bank, which a greedy k-center coreset (``ad.ops.coreset``) shrinks to ``coreset_ratio`` of its size.
A test patch scores its Euclidean distance to the nearest bank entry (``ad.ops.knn``); the anomaly
map is those distances, upsampled and blurred (σ=4); the image score is the largest patch distance
re-weighted by how isolated its nearest bank entry is (the paper's eq. 7, as anomalib computes it).

The map is upsampled bilinearly, as the paper's code does; anomalib 2.7 upsamples with
``F.interpolate``'s default, nearest. Scores are unaffected; with nearest upsampling given to both,
the maps agree with anomalib's to 1e-6 (``benchmarks/parity_frozen.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ad.backbone import BackboneSpec, FeatureExtractor, pixel_digests
from ad.cache import DiskCache
from ad.errors import ADError
from ad.models.base import AnomalyModel, Prediction
from ad.ops.cached import cached_per_item
from ad.ops.coreset import memory_bank_bytes, seeded_coreset, take_rows
from ad.ops.knn import INDEX_KINDS, BankSearch, MemoryGuard, NearestNeighbours, torch_nearest
from ad.postprocess import MapSmoother

#: Names how patches are embedded and searched in the nearest-neighbour cache keys: change it with either.
NEAREST_CACHE_TAG = "nearest: avg_pool 3x3, bilinear to the first layer, L2"


def as_patches(embedding: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C): a view of a channels-last embedding."""
    return embedding.permute(0, 2, 3, 1).reshape(embedding.shape[0], -1, embedding.shape[1])


class Patchcore(AnomalyModel):
    """PatchCore anomaly detector (see module docstring)."""

    def __init__(
        self,
        backbone: BackboneSpec,
        layers: tuple[str, ...] = ("layer2", "layer3"),
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        projection_dim: int | None = 128,
        index: str = "flat",
        blur_sigma: float = 4.0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        backbone = BackboneSpec.of(backbone)
        if not 0 < coreset_ratio <= 1:
            raise ADError(f"model.coreset_ratio: {coreset_ratio} is outside (0, 1]; 0.1 keeps 10% of the patches")
        if num_neighbors < 1:
            raise ADError(f"model.num_neighbors: {num_neighbors} must be at least 1 (1 = plain max patch distance)")
        if projection_dim is not None and projection_dim < 1:
            raise ADError(f"model.projection_dim: {projection_dim} must be positive, or null for anomalib's JL size")
        if index not in INDEX_KINDS:
            raise ADError(f"model.index: '{index}' is not one of {', '.join(INDEX_KINDS)}")
        self.extractor = FeatureExtractor.from_spec(backbone, list(layers))
        self.coreset_ratio, self.num_neighbors = float(coreset_ratio), int(num_neighbors)
        self.projection_dim, self.seed = projection_dim, seed
        self.register_buffer("memory_bank", torch.empty(0, 0))
        self.bank_search = BankSearch(index)
        self.smoother = MapSmoother(sigma=blur_sigma)
        self._cache: DiskCache | None = None  # set by use_cache (never pickled)

    def use_cache(self, cache: DiskCache | None) -> None:
        """Cache the backbone's features, the coreset order and each image's search in ``cache`` (None: none)."""
        super().use_cache(cache)
        self._cache = cache

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, C, h, w) locally aggregated patch features on the first layer's grid.

        Channels-last throughout: pooling and upsampling run faster on the CPU, and the
        (patches, C) rows the memory bank and the search need are then a view, not a copy.
        """
        features = [f.contiguous(memory_format=torch.channels_last) for f in self.extractor(images)]
        features = [F.avg_pool2d(f, kernel_size=3, stride=1, padding=1) for f in features]
        grid = features[0].shape[-2:]
        features = [f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                    for f in features]
        return torch.cat(features, dim=1)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, h*w, C) patch features, row-major over the grid."""
        return as_patches(self.embed(images))

    @torch.no_grad()
    def fit(self, batches: Iterable[dict], device: torch.device) -> None:
        """Collect every training patch, then keep a greedy k-center coreset of them as the memory bank."""
        guard = MemoryGuard(device, lambda n, dim: memory_bank_bytes(n, dim, self.coreset_ratio, self.projection_dim),
                            batches)
        try:  # from the first batch: does the whole bank fit before it is collected?
            chunks = guard.collect(batches, lambda batch: self.patches(batch["image"].to(device)).flatten(0, 1))
        except MemoryError as exc:
            raise ADError(f"dataset.image_size: PatchCore's memory bank {exc}; train on fewer images, lower "
                          "dataset.image_size, or use fewer model.layers (model.coreset_ratio only shrinks the "
                          "bank kept after selection)") from None
        if not chunks:
            raise ADError("dataset: PatchCore got no training images")
        n = sum(map(len, chunks))
        size = int(n * self.coreset_ratio)
        if size < 1:
            raise ADError(f"model.coreset_ratio: {self.coreset_ratio} keeps none of the {n} training patches; raise it")
        if self.num_neighbors > size:
            raise ADError(f"model.num_neighbors: {self.num_neighbors} is more than the {size} patches in the memory "
                          "bank; lower it or raise model.coreset_ratio")
        chosen = None if size == n else seeded_coreset(chunks, size, self.projection_dim, self.seed, self._cache)
        self.memory_bank = torch.cat(chunks) if chosen is None else take_rows(chunks, chosen)

    @property
    def search(self) -> NearestNeighbours:
        """The nearest-neighbour search over the memory bank."""
        return self.bank_search.search(self.memory_bank)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distance to, and index of, each query's nearest memory bank entry."""
        return self.search(queries)

    def cached_nearest(self, images: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``nearest`` over (B, h*w, C) patches, per image from the feature cache when this bank has
        searched this image before: a rerun, or a sweep over ``num_neighbors`` or ``blur_sigma``, skips
        the search (a new ``coreset_ratio`` makes a new bank, hence new keys)."""
        if self._cache is None:
            return self.nearest(patches.flatten(0, 1))
        keys = pixel_digests(images, NEAREST_CACHE_TAG, self.bank_search.digest(self.memory_bank),
                             self.bank_search.kind, self.extractor.identity())

        def search(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(t.view(len(rows), -1) for t in self.nearest(rows.flatten(0, 1)))

        distances, index = cached_per_item(self._cache, "nearest", keys, patches, search)
        return distances.reshape(-1), index.reshape(-1)

    def image_scores(self, patches: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Paper eq. 7 as anomalib computes it: s* times 1 - softmax(distances to m*'s neighbourhood)[0].

        s* is the largest patch distance of an image, m* that patch's nearest bank entry; the weight
        grows when the test patch is far from m*'s ``num_neighbors`` nearest bank entries (m* included).
        """
        if self.num_neighbors == 1:
            return distances.amax(1)
        rows = torch.arange(len(patches), device=patches.device)
        worst = distances.argmax(1)
        patch, score, m_star = patches[rows, worst], distances[rows, worst], nearest[rows, worst]
        _, support = torch_nearest(self.memory_bank[m_star], self.memory_bank, self.num_neighbors)
        to_support = torch.linalg.vector_norm(patch.unsqueeze(1) - self.memory_bank[support], dim=-1)
        return (1 - to_support.softmax(1)[:, 0]) * score

    def forward(self, images: torch.Tensor) -> Prediction:
        if self.memory_bank.numel() == 0:
            raise RuntimeError("Patchcore.forward called before fit")
        embedding = self.embed(images)
        b, c, h, w = embedding.shape
        patches = as_patches(embedding)
        distances, nearest = self.cached_nearest(images, patches)
        distances, nearest = distances.view(b, h * w), nearest.view(b, h * w)
        maps = self.smoother(distances.view(b, h, w), size=images.shape[-2:])
        return Prediction(scores=self.image_scores(patches, distances, nearest), maps=maps)

    def __getstate__(self) -> dict:
        """Pickle without the cache."""
        return {**super().__getstate__(), "_cache": None}
