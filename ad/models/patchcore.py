"""PatchCore: nearest-neighbour distance to a memory bank of nominal patches (Roth et al., CVPR 2022).

Features of layer2 and layer3 are averaged over 3x3 neighbourhoods, layer3 is upsampled to layer2's
grid and the two are concatenated into one vector per patch. All training patches form the memory
bank, which a greedy k-center coreset shrinks to ``coreset_ratio`` of its size. A test patch scores
its Euclidean distance to the nearest bank entry (an exact search, pruned by a low-rank bound on
CPU, faiss on GPU, or one of faiss's approximate indexes); the anomaly map is those distances,
upsampled and blurred (σ=4); the image score is the largest patch distance re-weighted by how
isolated its nearest bank entry is (the paper's eq. 7, as anomalib computes it).

The map is upsampled bilinearly, as the paper's code does; anomalib 2.7 upsamples with
``F.interpolate``'s default, nearest. Scores are unaffected; with nearest upsampling given to both,
the maps agree with anomalib's to 1e-6 (``benchmarks/parity_frozen.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import faiss
import torch
import torch.nn.functional as F

from ad.backbone import FeatureExtractor, pixel_digests
from ad.cache import digest
from ad.errors import ADError
from ad.models.base import AnomalyModel, Prediction
from ad.postprocess import MapSmoother
from ad.threads import single_threaded

#: Johnson-Lindenstrauss distortion anomalib uses to size its coreset projection (projection_dim: null).
JL_EPS = 0.9
#: faiss index kinds: exact search, or graph/inverted-list approximations for large banks.
INDEX_KINDS = ("flat", "hnsw", "ivf")
HNSW_LINKS, HNSW_EF_SEARCH = 32, 64
IVF_MIN_PROBES = 8
#: Share of the free memory the memory bank and its coreset workspace may take.
MEMORY_FRACTION = 0.8
#: The greedy coreset scans every row (faiss range search) instead of the rows the triangle
#: inequality leaves open once more than this share of them is open (gathers cost more than a scan).
OPEN_ROWS_SHARE = 0.2
ARGMAX_BLOCK = 256
#: Names how patches are embedded and searched in the nearest-neighbour cache keys: change it with either.
NEAREST_CACHE_TAG = "nearest: avg_pool 3x3, bilinear to the first layer, L2"


def jl_dim(n_samples: int, eps: float = JL_EPS) -> int:
    """Johnson-Lindenstrauss dimension for ``n_samples`` at distortion ``eps`` (sklearn's formula)."""
    return int(4 * math.log(n_samples) / (eps**2 / 2 - eps**3 / 3))


def sparse_random_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(in_dim, out_dim) Achlioptas/Li sparse random matrix, density 1/sqrt(in_dim), as anomalib and sklearn."""
    density = 1 / math.sqrt(in_dim)
    keep = torch.rand(in_dim, out_dim, generator=generator) < density
    signs = torch.randint(0, 2, (in_dim, out_dim), generator=generator) * 2 - 1
    return keep * signs * (math.sqrt(1 / density) / math.sqrt(out_dim))


class FarthestFirst:
    """Squared distance of every row to its closest chosen centre, updated one new centre at a time.

    On a GPU every row is updated by one matrix-vector product, without host syncs. On the CPU
    only rows the new centre can come closer to are visited: a row p owned by centre a cannot when
    |c - a|^2 >= 4 |p - a|^2 (triangle inequality), which on real features leaves under 10% of the
    rows after the first picks; when it leaves too many, a faiss range search finds the rows within
    the current covering radius of c (a single streaming pass, twice as fast as a matrix-vector
    product, and the only rows a new centre can move). Either way the picks are unchanged.
    """

    def __init__(self, features: torch.Tensor, capacity: int, exhaustive: bool | None = None) -> None:
        n, dim = features.shape
        self.features, self.prune = features, not (features.is_cuda if exhaustive is None else exhaustive)
        # padded to whole blocks for a two-level argmax (a flat CPU argmax is 10x slower); pads never win
        self.padded = torch.full((-(-n // ARGMAX_BLOCK) * ARGMAX_BLOCK,), -torch.inf, device=features.device)
        self.min_d = self.padded[:n].fill_(torch.inf)
        if self.prune:
            self.index = faiss.IndexFlatL2(dim)
            self.index.add(features.numpy())
            self.owner = torch.zeros(n, dtype=torch.int32)  # position of each row's closest centre
            self.centres, self.centres_sq = features.new_empty(capacity, dim), features.new_empty(capacity)
            self.count, self.wait, self.backoff = 0, 0, 1
        else:
            self.sq = features.square().sum(1)

    def add(self, idx: torch.Tensor) -> None:
        """Make row ``idx`` (a one-element tensor) a centre and shorten the distances it shortens."""
        centre = self.features.index_select(0, idx)
        if not self.prune:
            dist = torch.addmv(self.sq, self.features, centre[0], alpha=-2).add_(self.sq.index_select(0, idx))
            torch.minimum(self.min_d, dist.clamp_min_(0), out=self.min_d)
        else:
            i, radius = self.count, float(self.min_d[idx])
            self.centres[i:i + 1], self.centres_sq[i] = centre, centre.square().sum()
            self.count += 1
            rows = self._open_rows(centre[0]) if i > 0 else None
            if rows is not None:
                dist = (self.features.index_select(0, rows) - centre).square_().sum(1)
            else:  # only rows within the covering radius can come closer to the new centre
                _, dist, rows = self.index.range_search(centre.numpy(), radius)
                dist, rows = torch.from_numpy(dist), torch.from_numpy(rows)
            closer = dist < self.min_d.index_select(0, rows)
            rows = rows.masked_select(closer)
            self.min_d.index_copy_(0, rows, dist.masked_select(closer))
            self.owner.index_fill_(0, rows, i)
        self.min_d.index_fill_(0, idx, 0)

    def _open_rows(self, centre: torch.Tensor) -> torch.Tensor | None:
        """Rows with |c - owner|^2 < 4 min_d (0.1% slack against rounding), or None when too many are.

        After a test that leaves too many rows, the next ones come after 1, 2, 4... up to 64 steps.
        """
        if self.wait:
            self.wait -= 1
            return None
        i = self.count - 1
        between = torch.addmv(self.centres_sq[:i], self.centres[:i], centre, alpha=-2).add_(self.centres_sq[i])
        rows = (between.mul_(1 / 4.004).index_select(0, self.owner) < self.min_d).nonzero().squeeze(1)
        if rows.numel() <= OPEN_ROWS_SHARE * len(self.min_d):
            self.backoff = 1
            return rows
        self.backoff = min(2 * self.backoff, 64)
        self.wait = self.backoff - 1
        return None

    def farthest(self) -> torch.Tensor:
        """Index (a one-element tensor) of the row farthest from every centre; the first one on ties."""
        if not self.prune:
            return self.min_d.argmax().view(1)
        blocks = self.padded.view(-1, ARGMAX_BLOCK)
        block = blocks.amax(1).argmax().view(1)
        return block * ARGMAX_BLOCK + blocks.index_select(0, block).argmax(1)


def k_center_greedy(features: torch.Tensor, k: int, start: int, exhaustive: bool | None = None) -> torch.Tensor:
    """Indices of ``k`` rows picked farthest-first from row ``start`` (greedy k-center, start included).

    Each pick is the row farthest from all rows picked so far, as anomalib's KCenterGreedy after
    its fix #3509. ``exhaustive`` updates every row at every step (default: on GPUs only).
    """
    features = features.float().contiguous()
    state = FarthestFirst(features, k, exhaustive)
    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    idx = torch.tensor([start], device=features.device)
    with single_threaded(features.device):
        for i in range(k):
            chosen[i:i + 1] = idx
            if i < k - 1:
                state.add(idx)
                idx = state.farthest()
    return chosen


def as_patches(embedding: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C): a view of a channels-last embedding."""
    return embedding.permute(0, 2, 3, 1).reshape(embedding.shape[0], -1, embedding.shape[1])


def take_rows(chunks: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of the concatenation of ``chunks``, without materialising the concatenation."""
    out = chunks[0].new_empty(len(indices), chunks[0].shape[1])
    start = 0
    for chunk in chunks:
        hit = (indices >= start) & (indices < start + len(chunk))
        out[hit] = chunk[indices[hit] - start]
        start += len(chunk)
    return out


def size_text(n_bytes: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def batch_count(batches: Iterable) -> int | None:
    """How many batches an iterable will yield when it knows (DataLoader, tqdm), else None."""
    try:
        return len(batches)
    except TypeError:
        return None


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (cgroup limit included), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:  # containers: the cgroup v2 limit may be far below the host's free memory
        with open("/sys/fs/cgroup/memory.max") as f_max, open("/sys/fs/cgroup/memory.current") as f_cur:
            limit = f_max.read().strip()
            if limit != "max":
                room = int(limit) - int(f_cur.read())
                free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


def faiss_index(bank: torch.Tensor, kind: str) -> tuple[faiss.Index, object]:
    """A faiss L2 index holding ``bank`` (on the bank's GPU when faiss has GPU support), and its GPU resources."""
    n, dim = bank.shape
    if kind == "hnsw":
        spec = f"HNSW{HNSW_LINKS},Flat"
    elif kind == "ivf":
        spec = f"IVF{max(1, min(math.isqrt(n), n // 39))},Flat"  # faiss wants >= 39 points per list
    else:
        spec = "Flat"
    index = faiss.index_factory(dim, spec, faiss.METRIC_L2)
    data = bank.detach().float().cpu().contiguous().numpy()
    if kind == "hnsw":
        index.hnsw.efSearch = HNSW_EF_SEARCH
    if kind == "ivf":
        index.train(data)
        index.nprobe = min(index.nlist, max(IVF_MIN_PROBES, index.nlist // 32))
    resources = None
    if bank.is_cuda and kind != "hnsw":  # faiss has no GPU HNSW
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, bank.device.index or 0, index)
    index.add(data)
    return index, resources


def torch_nearest(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared L2 distances and indices of the ``k`` nearest bank rows, in bounded-memory chunks."""
    bank_sq = bank.square().sum(1)
    rows = max(1, 2**27 // len(bank))  # a (rows, bank) distance block of at most 512 MiB
    parts = [torch.addmm(bank_sq, q, bank.T, alpha=-2).topk(k, dim=1, largest=False) for q in queries.split(rows)]
    dist = torch.cat([p.values for p in parts]) + queries.square().sum(1, keepdim=True)
    return dist.clamp_min_(0), torch.cat([p.indices for p in parts])


def principal_basis(rows: torch.Tensor, rank: int, iterations: int = 2) -> torch.Tensor:
    """(C, rank) orthonormal basis near the rows' top principal subspace: a seeded randomised range
    finder with power iterations (0.17 s for 6144 x 1536 rows, where an eigendecomposition takes 0.65 s)."""
    sketch = torch.randn(rows.shape[1], rank, generator=torch.Generator().manual_seed(0)).to(rows)
    for _ in range(iterations):
        sketch = torch.linalg.qr(rows.T @ (rows @ sketch))[0]
    return torch.linalg.qr(sketch.double())[0].float().contiguous()  # orthonormal to fp32 precision


class PrunedSearch:
    """Exact nearest bank row per query, computing full distances only where a cheap lower bound allows.

    faiss's flat search compares every query with every bank row over all C features (an fp32
    GEMM). Here rows are first compared in the bank's top principal subspace: for an orthonormal
    basis U (C x k) and residuals r(x) = x - U U^T x, Pythagoras and the reverse triangle inequality give

        |q - b|^2 >= |U^T q - U^T b|^2 + (|r(q)| - |r(b)|)^2 = |q|^2 + |b|^2 - 2 (U^T q . U^T b + |r(q)| |r(b)|),

    one (k + 1)-wide matrix product instead of a C-wide one. A query's distance to the row with the
    smallest bound caps its nearest distance; only rows whose bound is below that cap can be nearer,
    and for those (query, row) pairs (about 1.5 per query on PatchCore's features) the fp32 distance is
    computed as faiss computes it, by a sampled matrix product. The answers are faiss's flat-index
    answers (ties go to the lowest row); a block of queries whose bound leaves too many pairs to pay
    off is handed to ``exact`` (faiss) instead. Written here because neither faiss nor torch prunes
    an exact search this way; on 40960 queries x 6144 rows x 1536 features it takes about 2 s, faiss 4 s.
    Rows are centred on the bank's mean first: distances are unchanged and norms, hence errors, shrink.
    """

    RANK = 128
    #: Slack on the bound for fp32 rounding, relative to (|q| + max|b|)^2 (typical errors are ~1e-6).
    MARGIN = 1e-4
    #: Above this share of candidate (query, row) pairs a block goes to the exact search instead.
    MAX_PAIR_SHARE = 0.05

    def __init__(self, bank: torch.Tensor, exact: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        bank = bank.float()
        self.centre = bank.mean(0)
        self.bank = bank - self.centre
        self.basis = principal_basis(self.bank, max(1, min(self.RANK, bank.shape[1] // 4)))
        self.bank_sq = self.bank.square().sum(1)
        self.bank_low = self.augment(self.bank)
        self.max_norm = float(self.bank_sq.max().sqrt())
        self.exact = exact
        self.pairs = self.exact_blocks = 0  # pairs measured in full, blocks sent to ``exact`` (last search)

    @staticmethod
    def suitable(bank: torch.Tensor) -> bool:
        """For CPU banks of more than a few features (GPU runs use faiss's GPU index or one GEMM)."""
        return bank.device.type == "cpu" and bank.shape[1] >= 16

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) centred rows -> (N, k + 1): coordinates in the basis, then the residual's norm."""
        low = x @ self.basis
        residual = torch.addmm(x, low, self.basis.T, alpha=-1)
        return torch.cat([low, torch.linalg.vector_norm(residual, dim=1, keepdim=True)], dim=1)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distance to, and index of, each query's nearest bank row."""
        self.pairs = self.exact_blocks = 0
        rows = max(1, 2**24 // len(self.bank))  # a (rows, bank) fp32 block of at most 64 MiB
        parts = [self._search(chunk) for chunk in queries.float().split(rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centred = queries - self.centre
        q_sq = centred.square().sum(1)
        bound = torch.addmm(self.bank_sq, self.augment(centred), self.bank_low.T, alpha=-2)  # lower bound - |q|^2
        guess = bound.argmin(1)
        cap = (centred - self.bank[guess]).square_().sum(1)  # the nearest row is at most this far
        slack = self.MARGIN * (q_sq.sqrt() + self.max_norm).square()
        candidates = bound <= (cap - q_sq + slack).unsqueeze(1)
        rows, cols = candidates.nonzero(as_tuple=True)  # row-major: the CSR order
        if len(cols) > self.MAX_PAIR_SHARE * candidates.numel():
            self.exact_blocks += 1
            return self.exact(queries)
        self.pairs += len(cols)
        starts = F.pad(torch.bincount(rows, minlength=len(queries)).cumsum(0), (1, 0))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            pattern = torch.sparse_csr_tensor(starts, cols, centred.new_ones(len(cols)), size=candidates.shape,
                                              check_invariants=False)
            dots = torch.sparse.sampled_addmm(pattern, centred, self.bank.T, beta=0.0).values()
        dist = self.bank_sq[cols] - 2 * dots  # the squared distance less |q|^2, as faiss computes it
        best = dist.new_full((len(queries),), torch.inf).scatter_reduce_(0, rows, dist, "amin")
        wins = dist == best[rows]
        index = cols.new_full((len(queries),), len(self.bank)).scatter_reduce_(0, rows[wins], cols[wins], "amin")
        return (centred - self.bank[index]).square_().sum(1), index  # directly: no cancellation near 0


class Patchcore(AnomalyModel):
    """PatchCore anomaly detector (see module docstring)."""

    def __init__(
        self,
        backbone: dict,
        layers: tuple[str, ...] = ("layer2", "layer3"),
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        projection_dim: int | None = 128,
        index: str = "flat",
        blur_sigma: float = 4.0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if not 0 < coreset_ratio <= 1:
            raise ADError(f"model.coreset_ratio: {coreset_ratio} is outside (0, 1]; 0.1 keeps 10% of the patches")
        if num_neighbors < 1:
            raise ADError(f"model.num_neighbors: {num_neighbors} must be at least 1 (1 = plain max patch distance)")
        if projection_dim is not None and projection_dim < 1:
            raise ADError(f"model.projection_dim: {projection_dim} must be positive, or null for anomalib's JL size")
        if index not in INDEX_KINDS:
            raise ADError(f"model.index: '{index}' is not one of {', '.join(INDEX_KINDS)}")
        self.extractor = FeatureExtractor(layers=list(layers), **backbone)
        self.coreset_ratio, self.num_neighbors = float(coreset_ratio), int(num_neighbors)
        self.projection_dim, self.index_kind, self.seed = projection_dim, index, seed
        self.register_buffer("memory_bank", torch.empty(0, 0))
        self.smoother = MapSmoother(sigma=blur_sigma)
        self._index = None  # faiss index over memory_bank, built on first use (never pickled)
        self._pruned = None  # pruned exact search over memory_bank, likewise
        self._bank_digest = None  # hash of memory_bank for the nearest-neighbour cache, likewise

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, C, h, w) locally aggregated patch features on the first layer's grid.

        Channels-last throughout: pooling and upsampling run 3x faster on the CPU, and the
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
        chunks, budget, n_batches = [], None, batch_count(batches)
        for batch in batches:
            x = self.patches(batch["image"].to(device))
            chunks.append(x.reshape(-1, x.shape[-1]))
            if budget is None:  # from the first batch: does the whole bank fit before it is collected?
                free = free_memory(device)
                budget = None if free is None else int(MEMORY_FRACTION * free)
                expected = n_batches * len(x) if n_batches else len(x)
                self._check_memory(expected, x, budget, device)
            self._check_memory(sum(map(len, chunks)) // x.shape[1], x, budget, device)
        if not chunks:
            raise ADError("dataset: PatchCore got no training images")
        n = sum(map(len, chunks))
        size = int(n * self.coreset_ratio)
        if size < 1:
            raise ADError(f"model.coreset_ratio: {self.coreset_ratio} keeps none of the {n} training patches; raise it")
        if self.num_neighbors > size:
            raise ADError(f"model.num_neighbors: {self.num_neighbors} is more than the {size} patches in the memory "
                          "bank; lower it or raise model.coreset_ratio")
        self.memory_bank = torch.cat(chunks) if size == n else take_rows(chunks, self.coreset(chunks, size))
        self._index = self._pruned = self._bank_digest = None

    def coreset(self, chunks: list[torch.Tensor], size: int) -> torch.Tensor:
        """Indices of the greedy k-center coreset, chosen on a seeded sparse random projection."""
        generator = torch.Generator().manual_seed(self.seed)
        n, dim = sum(map(len, chunks)), chunks[0].shape[1]
        out_dim = self.projection_dim or jl_dim(n)
        if out_dim < dim:
            matrix = sparse_random_projection(dim, out_dim, generator).to(chunks[0].device)
            reduced = torch.cat([chunk @ matrix for chunk in chunks])
        else:
            reduced = torch.cat(chunks)
        reduced -= reduced.mean(0)  # distances are unchanged; smaller norms mean less fp32 cancellation
        start = int(torch.randint(n, (1,), generator=generator))
        # Farthest-first picks don't depend on k, so a sweep over coreset_ratio reuses the longest
        # order computed on the same projected bank: any smaller coreset is its prefix.
        cache = self.extractor.cache
        key = digest("coreset", reduced.cpu().numpy().tobytes(), str(start)) if cache is not None else None
        if key is not None and (order := cache.load("coreset", key)) is not None and len(order) >= size:
            return order[:size].to(reduced.device)
        chosen = k_center_greedy(reduced, size, start)
        if key is not None:
            cache.save("coreset", key, chosen.cpu())
        return chosen

    def _check_memory(self, n_images: int, x: torch.Tensor, budget: int | None, device: torch.device) -> None:
        """Raise before collecting a bank (patches, projection, coreset) larger than the budget."""
        if budget is None:
            return
        per_image, dim = x.shape[1], x.shape[2]
        n = n_images * per_image
        # coreset workspace: the projected rows, faiss's copy of them, and per-row distances and owners
        work = 0 if self.coreset_ratio == 1 else n * (2 * min(dim, self.projection_dim or jl_dim(n)) + 2)
        # the kept bank, and the search's centred copy of it (PrunedSearch or faiss)
        need = 4 * (n * dim + work + 2 * int(n * self.coreset_ratio) * dim)
        if need > budget:
            raise ADError(
                f"dataset.image_size: PatchCore's memory bank of {n_images} images x {per_image} patches x {dim} "
                f"features needs {size_text(need)} but only {size_text(budget)} of {device.type} memory "
                "is available; train on fewer images, lower dataset.image_size, or use fewer model.layers "
                "(model.coreset_ratio only shrinks the bank kept after selection)"
            )

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distance to, and index of, each query's nearest memory bank entry."""
        if self.memory_bank.is_cuda and self.index_kind == "flat" and not hasattr(faiss, "StandardGpuResources"):
            squared, index = torch_nearest(queries, self.memory_bank)  # faiss-cpu on a GPU run: stay on the GPU
            return squared.sqrt().squeeze(1), index.squeeze(1)
        if self.index_kind == "flat" and PrunedSearch.suitable(self.memory_bank):
            squared, index = self.pruned.search(queries.detach())
        else:
            squared, index = self.faiss_search(queries)
        return squared.to(queries.device).clamp_min_(0).sqrt(), index.to(queries.device)

    def cached_nearest(self, images: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``nearest`` over (B, h*w, C) patches, per image from the feature cache when this bank has
        searched this image before: a rerun, or a sweep over ``num_neighbors`` or ``blur_sigma``, skips
        the search (a new ``coreset_ratio`` makes a new bank, hence new keys)."""
        cache = self.extractor.cache
        if cache is None:
            return self.nearest(patches.reshape(-1, patches.shape[-1]))
        search = (NEAREST_CACHE_TAG, self.bank_digest(), self.index_kind, self.extractor.identity())
        keys = pixel_digests(images, *search)
        found = [cache.load("nearest", key) for key in keys]
        if any(entry is None for entry in found):
            distances, index = self.nearest(patches.reshape(-1, patches.shape[-1]))
            found = list(zip(distances.view(len(keys), -1).cpu(), index.view(len(keys), -1).cpu(), strict=True))
            for key, (d, i) in zip(keys, found, strict=True):
                cache.save_async("nearest", key, [d.clone(), i.clone()])
        distances, index = (torch.cat([entry[k] for entry in found]).to(patches.device) for k in (0, 1))
        return distances, index

    def bank_digest(self) -> str:
        """Hash of the memory bank's contents, recomputed only when the bank changed."""
        return self._from_bank("_bank_digest", lambda bank: digest("bank", bank.detach().cpu().contiguous().numpy()))

    def faiss_search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distance to, and index of, the nearest entry in the faiss index (CPU tensors)."""
        faiss.omp_set_num_threads(torch.get_num_threads())
        squared, index = self.knn_index.search(queries.detach().float().cpu().contiguous().numpy(), 1)
        return torch.from_numpy(squared[:, 0]), torch.from_numpy(index[:, 0])

    @property
    def pruned(self) -> PrunedSearch:
        """The pruned exact search over the memory bank, rebuilt whenever the bank changed."""
        return self._from_bank("_pruned", lambda bank: PrunedSearch(bank, self.faiss_search))

    @property
    def knn_index(self) -> faiss.Index:
        """The faiss index over the memory bank, rebuilt whenever the bank moved or changed."""

        def build(bank: torch.Tensor) -> tuple[faiss.Index, object]:
            if bank.is_cuda and not hasattr(faiss, "StandardGpuResources"):
                warnings.warn("faiss has no GPU support here (pip install 'ad[gpu]'); searching on the CPU",
                              stacklevel=4)
                bank = bank.cpu()
            faiss.omp_set_num_threads(torch.get_num_threads())
            return faiss_index(bank, self.index_kind)  # the index and its GPU resources, kept together

        return self._from_bank("_index", build)[0]

    def _from_bank(self, slot: str, build: Callable[[torch.Tensor], object]):
        """``build(memory_bank)``, kept in attribute ``slot`` as (bank key, value) until the bank moves or changes."""
        bank = self.memory_bank
        key = (bank.device, bank.data_ptr(), bank._version, tuple(bank.shape))
        held = getattr(self, slot, None)  # absent in pickles from before the slot existed
        if held is None or held[0] != key:
            held = (key, build(bank))
            setattr(self, slot, held)
        return held[1]

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
        """Pickle without the search structures (faiss's is not picklable); rebuilt from the bank on first use."""
        return {**self.__dict__, "_index": None, "_pruned": None, "_bank_digest": None}
