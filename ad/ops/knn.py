"""Nearest-neighbour search over a bank of rows: exact (torch), pruned exact (CPU), faiss (exact or approximate).

``NearestNeighbours`` picks the back end for a bank; ``free_memory`` says how large a bank the
device can still hold (``/proc/meminfo``, the cgroup v2 limit, or CUDA's free memory).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ad.cache import digest

if TYPE_CHECKING:  # faiss is imported where it is used: a run whose searches are cached never loads it
    import faiss

#: faiss index kinds: exact search, or graph/inverted-list approximations for large banks.
INDEX_KINDS = ("flat", "hnsw", "ivf")
HNSW_LINKS, HNSW_EF_SEARCH = 32, 64
IVF_MIN_PROBES = 8

SearchFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _check_rows(queries: torch.Tensor, bank: torch.Tensor, caller: str) -> None:
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1] or len(bank) == 0:
        raise ValueError(f"{caller}: needs queries (M, D) and a non-empty bank (N, D), got "
                         f"{tuple(queries.shape)} and {tuple(bank.shape)}")


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


def size_text(n_bytes: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


class MemoryGuard:
    """Raises ``MemoryError`` before a bank collected batch by batch outgrows the device's free memory.

    Memory is probed once, at the first batch; when the number of batches is known, that first
    check is for the whole bank, so a bank that cannot fit fails before it is collected.

    Args:
        device: where the bank is collected.
        need: bytes a bank of (rows, dim) takes, its workspace included.
        batches: the batches to come; their ``len()``, when they know it (a DataLoader, tqdm), sizes the first check.
        fraction: share of the free memory the bank may take.
    """

    def __init__(self, device: torch.device, need: Callable[[int, int], int], batches: Iterable,
                 fraction: float = 0.8) -> None:
        self.device, self.need, self.fraction = device, need, fraction
        try:
            self.batches = len(batches)
        except TypeError:
            self.batches = None
        self.budget: int | None = None

    def check(self, batch_rows: int, rows: int, dim: int) -> None:
        """After a batch of ``batch_rows`` rows of ``dim`` features, ``rows`` collected in all."""
        if self.budget is None:
            free = free_memory(self.device)
            self.budget = None if free is None else int(self.fraction * free)
            self._check(batch_rows * self.batches if self.batches else rows, dim)
        self._check(rows, dim)

    def collect(self, batches: Iterable, rows: Callable[[object], torch.Tensor]) -> list[torch.Tensor]:
        """``rows(batch)``, an (n, dim) block, for every batch, checking the bank after each."""
        chunks = []
        for batch in batches:
            chunks.append(rows(batch))
            self.check(len(chunks[-1]), sum(map(len, chunks)), chunks[-1].shape[-1])
        return chunks

    def _check(self, rows: int, dim: int) -> None:
        if self.budget is not None and (need := self.need(rows, dim)) > self.budget:
            raise MemoryError(f"needs {size_text(need)} but only {size_text(self.budget)} of "
                              f"{self.device.type} memory is available")


def torch_nearest(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest bank rows per query by matrix products, in bounded-memory chunks.

    Args:
        queries: (M, D) rows.
        bank: (N, D) rows.
        k: neighbours per query, 1..N.

    Returns:
        (M, k) squared L2 distances (ascending) and (M, k) bank indices.
    """
    _check_rows(queries, bank, "torch_nearest")
    if not 1 <= k <= len(bank):
        raise ValueError(f"torch_nearest: k={k} is outside 1..{len(bank)} (the bank's rows)")
    bank_sq = bank.square().sum(1)
    rows = max(1, 2**27 // len(bank))  # a (rows, bank) distance block of at most 512 MiB
    parts = [torch.addmm(bank_sq, q, bank.T, alpha=-2).topk(k, dim=1, largest=False) for q in queries.split(rows)]
    dist = torch.cat([p.values for p in parts]) + queries.square().sum(1, keepdim=True)
    return dist.clamp_min_(0), torch.cat([p.indices for p in parts])


def faiss_has_gpu() -> bool:
    """Whether the installed faiss was built with GPU support."""
    import faiss

    return hasattr(faiss, "StandardGpuResources")


def faiss_index(bank: torch.Tensor, kind: str) -> tuple[faiss.Index, object]:
    """A faiss L2 index holding ``bank`` (on the bank's GPU when faiss has GPU support), and its GPU resources.

    Args:
        bank: (N, D) rows.
        kind: one of ``INDEX_KINDS``.
    """
    import faiss

    if kind not in INDEX_KINDS:
        raise ValueError(f"faiss_index: kind '{kind}' is not one of {', '.join(INDEX_KINDS)}")
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


def principal_basis(rows: torch.Tensor, rank: int, iterations: int = 2) -> torch.Tensor:
    """Orthonormal basis near the rows' top principal subspace: a seeded randomised range finder
    with power iterations (several times faster than an eigendecomposition on PatchCore's banks).

    Args:
        rows: (N, C) centred rows.
        rank: basis width k, 1..C.

    Returns:
        (C, k) float32 basis with orthonormal columns.
    """
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
    off is handed to ``exact`` (faiss) instead. Written by hand because neither faiss nor torch prunes
    an exact search this way. Rows are centred on the bank's mean first: distances are unchanged and
    norms, hence errors, shrink.

    Args:
        bank: (N, C) rows.
        exact: the fallback search, (M, C) queries -> (M,) squared distances and (M,) indices.
    """

    RANK = 128
    #: Slack on the bound for fp32 rounding, relative to (|q| + max|b|)^2 (typical errors are ~1e-6).
    MARGIN = 1e-4
    #: Above this share of candidate (query, row) pairs a block goes to the exact search instead.
    MAX_PAIR_SHARE = 0.05

    def __init__(self, bank: torch.Tensor, exact: SearchFn) -> None:
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"PrunedSearch: needs a non-empty (N, C) bank, got {tuple(bank.shape)}")
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
        """(M, C) queries -> (M,) squared distance to, and (M,) index of, each query's nearest bank row."""
        _check_rows(queries, self.bank, "PrunedSearch.search")
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


class NearestNeighbours:
    """Nearest bank row per query by the best back end for the bank; search structures are built on first use.

    ``flat`` is exact: pruned on CPU banks, faiss's GPU index on GPU banks (one matrix product when
    faiss has no GPU support); ``hnsw`` and ``ivf`` are faiss's approximate indexes.

    Args:
        bank: (N, D) rows, kept by reference (do not change it in place).
        kind: one of ``INDEX_KINDS``.
    """

    def __init__(self, bank: torch.Tensor, kind: str = "flat") -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"NearestNeighbours: kind '{kind}' is not one of {', '.join(INDEX_KINDS)}")
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"NearestNeighbours: needs a non-empty (N, D) bank, got {tuple(bank.shape)}")
        self.bank, self.kind = bank, kind
        self._index: tuple[faiss.Index, object] | None = None  # the index and its GPU resources, kept together
        self._pruned: PrunedSearch | None = None

    def __call__(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) queries -> (M,) Euclidean distance to, and (M,) index of, the nearest bank row."""
        _check_rows(queries, self.bank, "NearestNeighbours")
        if self.bank.is_cuda and self.kind == "flat" and not faiss_has_gpu():
            squared, index = torch_nearest(queries, self.bank)  # faiss-cpu on a GPU run: stay on the GPU
            return squared.sqrt().squeeze(1), index.squeeze(1)
        if self.kind == "flat" and PrunedSearch.suitable(self.bank):
            squared, index = self.pruned.search(queries.detach())
        else:
            squared, index = self.faiss_search(queries)
        return squared.to(queries.device).clamp_min_(0).sqrt(), index.to(queries.device)

    def faiss_search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) queries -> (M,) squared distance to, and (M,) index of, the nearest row in the faiss index (CPU)."""
        squared, index = self.index.search(queries.detach().float().cpu().contiguous().numpy(), 1)
        return torch.from_numpy(squared[:, 0]), torch.from_numpy(index[:, 0])

    @property
    def pruned(self) -> PrunedSearch:
        """The pruned exact search over the bank, falling back to faiss for blocks it cannot prune."""
        if self._pruned is None:
            self._pruned = PrunedSearch(self.bank, self.faiss_search)
        return self._pruned

    @property
    def index(self) -> faiss.Index:
        """The faiss index over the bank (on its GPU when faiss has GPU support)."""
        if self._index is None:
            bank = self.bank
            if bank.is_cuda and not faiss_has_gpu():
                warnings.warn("faiss has no GPU support here (pip install 'ad[gpu]'); searching on the CPU",
                              stacklevel=3)
                bank = bank.cpu()
            self._index = faiss_index(bank, self.kind)
        return self._index[0]


class BankSearch:
    """``NearestNeighbours`` over a model's memory bank, and the bank's digest, rebuilt whenever the bank changes.

    The bank is a buffer that ``fit`` or a checkpoint replaces, so what is built from it is keyed on
    its storage, in-place version and shape. Pickles empty: faiss indexes cannot be pickled, and
    both are rebuilt from the bank on first use.

    Args:
        kind: one of ``INDEX_KINDS``.
    """

    def __init__(self, kind: str = "flat") -> None:
        self.kind = kind
        self._built: dict[str, tuple[tuple, object]] = {}

    def search(self, bank: torch.Tensor) -> NearestNeighbours:
        """The search over ``bank``."""
        return self._from(bank, "search", lambda: NearestNeighbours(bank, self.kind))

    def digest(self, bank: torch.Tensor) -> str:
        """A content hash of ``bank``, for cache keys of searches over it."""
        return self._from(bank, "digest", lambda: digest("bank", bank.detach().cpu().contiguous().numpy()))

    def _from(self, bank: torch.Tensor, slot: str, build: Callable[[], object]):
        key = (bank.device, bank.data_ptr(), bank._version, tuple(bank.shape))
        built = self._built.get(slot)
        if built is None or built[0] != key:
            built = self._built[slot] = (key, build())
        return built[1]

    def __getstate__(self) -> dict:
        return {"kind": self.kind, "_built": {}}
