"""Greedy k-center coreset (farthest-first traversal) and the sparse random projection it runs on."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ad.threads import single_threaded

if TYPE_CHECKING:
    from ad.cache import DiskCache

#: Johnson-Lindenstrauss distortion anomalib uses to size its coreset projection (projection_dim: null).
JL_EPS = 0.9
#: The greedy coreset scans every row (faiss range search) instead of the rows the triangle
#: inequality leaves open once more than this share of them is open (gathers cost more than a scan).
OPEN_ROWS_SHARE = 0.2
ARGMAX_BLOCK = 256


def jl_dim(n_samples: int, eps: float = JL_EPS) -> int:
    """Johnson-Lindenstrauss dimension for ``n_samples`` at distortion ``eps`` (sklearn's formula)."""
    if n_samples < 2 or not 0 < eps < 1:
        raise ValueError(f"jl_dim: needs n_samples >= 2 and 0 < eps < 1, got {n_samples} and {eps}")
    return int(4 * math.log(n_samples) / (eps**2 / 2 - eps**3 / 3))


def sparse_random_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """Achlioptas/Li sparse random matrix, density 1/sqrt(in_dim), as anomalib and sklearn draw it.

    Returns:
        (in_dim, out_dim) matrix with entries 0 or ±sqrt(1/density)/sqrt(out_dim); ``x @ matrix`` projects.
    """
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"sparse_random_projection: dimensions must be positive, got {in_dim} -> {out_dim}")
    density = 1 / math.sqrt(in_dim)
    keep = torch.rand(in_dim, out_dim, generator=generator) < density
    signs = torch.randint(0, 2, (in_dim, out_dim), generator=generator) * 2 - 1
    return keep * signs * (math.sqrt(1 / density) / math.sqrt(out_dim))


class FarthestFirst:
    """Squared distance of every row to its closest chosen centre, updated one new centre at a time.

    On a GPU every row is updated by one matrix-vector product, without host syncs. On the CPU
    only rows the new centre can come closer to are visited: a row p owned by centre a cannot when
    |c - a|^2 >= 4 |p - a|^2 (triangle inequality), which on real features leaves a small share of
    the rows after the first picks; when it leaves too many, a faiss range search finds the rows within
    the current covering radius of c (a single streaming pass, and the only rows a new centre can
    move). Either way the picks are unchanged.

    Args:
        features: (N, D) float32 rows, contiguous.
        capacity: how many centres will be added at most.
        exhaustive: update every row at every step (default: on GPUs only).
    """

    def __init__(self, features: torch.Tensor, capacity: int, exhaustive: bool | None = None) -> None:
        n, dim = features.shape
        self.features, self.prune = features, not (features.is_cuda if exhaustive is None else exhaustive)
        # padded to whole blocks for a two-level argmax (a flat CPU argmax is much slower); pads never win
        self.padded = torch.full((-(-n // ARGMAX_BLOCK) * ARGMAX_BLOCK,), -torch.inf, device=features.device)
        self.min_d = self.padded[:n].fill_(torch.inf)
        if self.prune:
            import faiss  # here: a run whose coreset is cached never loads faiss

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
    """Rows picked farthest-first: each pick is the row farthest from all rows picked so far.

    As anomalib's KCenterGreedy after its fix #3509. The order does not depend on ``k``: a smaller
    coreset is a prefix of a larger one.

    Args:
        features: (N, D) rows.
        k: how many rows to pick, 1..N.
        start: the first pick, 0..N-1.
        exhaustive: update every row at every step (default: on GPUs only); the picks are the same.

    Returns:
        (k,) long indices into the rows, ``start`` first.
    """
    if features.ndim != 2:
        raise ValueError(f"k_center_greedy: features must be (N, D), got shape {tuple(features.shape)}")
    if not 1 <= k <= len(features) or not 0 <= start < len(features):
        raise ValueError(f"k_center_greedy: needs 1 <= k <= N and 0 <= start < N, got k={k}, start={start}, "
                         f"N={len(features)}")
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



def cached_k_center(features: torch.Tensor, k: int, start: int, cache: DiskCache) -> torch.Tensor:
    """``k_center_greedy(features, k, start)``, reusing an order cached for the same rows and start.

    Farthest-first picks don't depend on k, so any order at least k long holds the answer as its
    prefix: a sweep over the coreset size computes the longest order once.
    """
    from ad.cache import digest
    from ad.ops.cached import lookup_or_compute

    def long_enough(key: str) -> torch.Tensor | None:
        order = cache.load("coreset", key)
        return order if order is not None and len(order) >= k else None

    key = digest("coreset", features.cpu().numpy().tobytes(), str(start))
    (order,), _ = lookup_or_compute([key], long_enough, lambda _: [k_center_greedy(features, k, start).cpu()],
                                    lambda key, order: cache.save("coreset", key, order))
    return order[:k].to(features.device)


def seeded_coreset(chunks: list[torch.Tensor], k: int, projection_dim: int | None, seed: int,
                   cache: DiskCache | None = None) -> torch.Tensor:
    """Indices of the greedy k-center coreset of the rows of ``chunks``, picked on a seeded sparse projection.

    Args:
        chunks: (N_i, D) blocks of rows, concatenated in order.
        k: coreset size.
        projection_dim: projected width; None sizes it by Johnson-Lindenstrauss, as anomalib does.
        seed: draws the projection, then the first centre.
        cache: reuses the longest order found for the same projected rows (``cached_k_center``).

    Returns:
        (k,) long indices into the N = ΣN_i rows.
    """
    generator = torch.Generator().manual_seed(seed)
    n = sum(map(len, chunks))
    reduced = project_rows(chunks, projection_dim or jl_dim(n), generator)
    start = int(torch.randint(n, (1,), generator=generator))
    return k_center_greedy(reduced, k, start) if cache is None else cached_k_center(reduced, k, start, cache)


def project_rows(chunks: list[torch.Tensor], out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """Rows projected by a seeded sparse random matrix when that shrinks them, then centred.

    Centring leaves distances unchanged and shrinks norms, hence fp32 cancellation in the greedy search.

    Args:
        chunks: (N_i, D) blocks of rows, concatenated in order.
        out_dim: projected width; at D or above the rows are kept as they are.
        generator: draws the projection matrix (nothing is drawn when none is needed).

    Returns:
        (N, min(out_dim, D)) centred rows, a new tensor.
    """
    if not chunks or any(chunk.ndim != 2 or chunk.shape[1] != chunks[0].shape[1] for chunk in chunks):
        raise ValueError("project_rows: needs one or more (N_i, D) blocks of the same width D")
    dim = chunks[0].shape[1]
    if out_dim < dim:
        matrix = sparse_random_projection(dim, out_dim, generator).to(chunks[0].device)
        reduced = torch.cat([chunk @ matrix for chunk in chunks])
    else:
        reduced = torch.cat(chunks)
    return reduced.sub_(reduced.mean(0))


def take_rows(chunks: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of the concatenation of ``chunks``, without materialising the concatenation.

    Args:
        chunks: (N_i, D) blocks of rows.
        indices: (k,) long indices into the N = ΣN_i rows.

    Returns:
        (k, D) rows.
    """
    out = chunks[0].new_empty(len(indices), chunks[0].shape[1])
    start = 0
    for chunk in chunks:
        hit = (indices >= start) & (indices < start + len(chunk))
        out[hit] = chunk[indices[hit] - start]
        start += len(chunk)
    return out


def memory_bank_bytes(n: int, dim: int, ratio: float, projection_dim: int | None) -> int:
    """fp32 bytes to hold n rows of ``dim`` features, select a coreset of ``ratio`` of them on a projection
    of ``projection_dim`` (None: ``jl_dim``) and search the kept rows (their copy in a search index).
    """
    # workspace: the projected rows, faiss's copy of them, and per-row distances and owners
    work = 0 if ratio == 1 else n * (2 * min(dim, projection_dim or jl_dim(n)) + 2)
    return 4 * (n * dim + work + 2 * int(n * ratio) * dim)
