"""ad.ops against plain references: numpy k-center, torch.cdist, full-covariance Mahalanobis, sklearn PCA, scipy KDE."""

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde
from sklearn.decomposition import PCA as SklearnPCA

import ad.ops.coreset as coreset
from ad.ops.cached import lookup_or_compute
from ad.ops.coreset import jl_dim, k_center_greedy, project_rows, sparse_random_projection, take_rows
from ad.ops.gaussian import (
    BlockGaussianSums,
    block_mahalanobis,
    block_precision,
    gaussian_fit,
    inverse_cholesky_,
    mahalanobis,
)
from ad.ops.kde import fit_kde, kde_log_density
from ad.ops.knn import NearestNeighbours, PrunedSearch, free_memory, torch_nearest
from ad.ops.pca import component_count, fit_pca


def numpy_k_center(features: np.ndarray, k: int, start: int) -> list[int]:
    """The textbook greedy k-center in float64: pick the row farthest from every row picked so far."""
    chosen, min_d = [start], np.full(len(features), np.inf)
    for _ in range(k - 1):
        min_d = np.minimum(min_d, np.linalg.norm(features - features[chosen[-1]], axis=1))
        chosen.append(int(min_d.argmax()))
    return chosen


@pytest.mark.parametrize("clustered", [False, True])
def test_coreset_is_the_numpy_greedy_k_center(clustered, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(1500, 24, generator=generator)
    if clustered:  # real features are clustered: most rows are skipped by the triangle inequality
        rows = 0.3 * rows + 4 * torch.randn(30, 24, generator=generator)[torch.arange(1500) % 30]
    k, start = 150, 123
    expected = numpy_k_center(rows.double().numpy(), k, start)
    assert k_center_greedy(rows, k, start).tolist() == expected
    assert k_center_greedy(rows, k, start, exhaustive=True).tolist() == expected  # the GPU way
    monkeypatch.setattr(coreset, "OPEN_ROWS_SHARE", -1.0)  # a faiss range search at every step
    assert k_center_greedy(rows, k, start).tolist() == expected


def test_greedy_order_does_not_depend_on_k():
    features = torch.randn(800, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(k_center_greedy(features, 30, 7), k_center_greedy(features, 80, 7)[:30])


def test_coreset_checks_its_inputs():
    with pytest.raises(ValueError, match="1 <= k <= N"):
        k_center_greedy(torch.randn(10, 4), 11, 0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        k_center_greedy(torch.randn(10), 2, 0)


def test_projection_matches_anomalib_sizes_and_entries():
    assert jl_dim(61_440) == 272 and jl_dim(214_016) == 303  # anomalib's eps=0.9 sizes
    matrix = sparse_random_projection(1536, 128, torch.Generator().manual_seed(0))
    density, scale = 1536**-0.5, (1536**0.5 / 128) ** 0.5  # entries 0 or +-sqrt(1/density)/sqrt(out_dim)
    nonzero = matrix[matrix != 0]
    torch.testing.assert_close(nonzero.abs(), torch.full_like(nonzero, scale))
    assert abs(nonzero.numel() / matrix.numel() - density) < 0.003 and abs((nonzero > 0).float().mean() - 0.5) < 0.02


def test_projected_rows_are_centred_and_chunks_are_taken_in_order():
    chunks = list(torch.randn(50, 64, generator=torch.Generator().manual_seed(1)).split([20, 30]))
    matrix = sparse_random_projection(64, 8, torch.Generator().manual_seed(2))
    projected = project_rows(chunks, 8, torch.Generator().manual_seed(2))
    expected = torch.cat(chunks) @ matrix
    torch.testing.assert_close(projected, expected - expected.mean(0))
    assert project_rows(chunks, 64, torch.Generator()).shape == (50, 64)  # no wider than the rows: kept
    indices = torch.tensor([49, 0, 20, 19])
    assert torch.equal(take_rows(chunks, indices), torch.cat(chunks)[indices])


def low_rank_rows(count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Rows whose variance sits mostly in a few directions, as CNN patch features' does."""
    scales = torch.cat([torch.ones(6), torch.full((dim - 6,), 0.02)])
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(dim)))[0]
    return (torch.randn(count, dim, generator=generator) * scales) @ rotation + 3


def exact_search(bank):
    return lambda queries: tuple(t[:, 0] for t in torch_nearest(queries, bank))


@pytest.mark.parametrize("k", [1, 5])
def test_torch_nearest_is_cdist_and_topk(k):
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(500, 48, generator=generator), torch.randn(300, 48, generator=generator)
    expected = torch.cdist(queries.double(), bank.double()).topk(k, dim=1, largest=False)
    squared, index = torch_nearest(queries, bank, k)
    assert torch.equal(index, expected.indices)
    torch.testing.assert_close(squared.double().sqrt(), expected.values, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="k=501"):
        torch_nearest(queries, bank, 501)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_nearest_neighbours_back_ends_are_cdist(kind):
    generator = torch.Generator().manual_seed(0)
    bank, queries = low_rank_rows(500, 48, generator), low_rank_rows(300, 48, generator)
    expected = torch.cdist(queries.double(), bank.double()).min(1)
    search = NearestNeighbours(bank, kind)
    distances, nearest = search(queries)
    if kind == "flat":  # exact: pruned on the CPU, checked against faiss's flat index too
        assert search.pruned.pairs >= len(queries) and torch.equal(nearest, expected.indices)
        torch.testing.assert_close(distances.double(), expected.values, rtol=1e-4, atol=1e-4)
        squared, index = search.faiss_search(queries)
        assert torch.equal(index, expected.indices)
        torch.testing.assert_close(squared.double().sqrt(), expected.values, rtol=1e-4, atol=1e-4)
    else:  # approximate: never closer than exact, mostly the same neighbour
        assert (distances >= expected.values - 1e-4).all() and (nearest == expected.indices).float().mean() > 0.7
    with pytest.raises(ValueError, match="queries"):
        search(queries[:, :10])


@pytest.mark.parametrize("n, dim", [(400, 48), (1500, 384)])
def test_pruned_search_finds_the_exact_nearest_row(n, dim):
    generator = torch.Generator().manual_seed(n)
    bank, queries = low_rank_rows(n, dim, generator), low_rank_rows(600, dim, generator)
    queries[:100] = bank[:100] + 1e-3 * torch.randn(100, dim, generator=generator)  # near-duplicates of bank rows
    expected = torch.cdist(queries.double(), bank.double()).min(1)
    search = PrunedSearch(bank, exact_search(bank))
    squared, index = search.search(queries)
    assert torch.equal(index, expected.indices)
    torch.testing.assert_close(squared.double().sqrt(), expected.values, rtol=1e-5, atol=1e-5)
    assert len(queries) <= search.pairs < 0.05 * n * len(queries) and search.exact_blocks == 0  # the bound pruned


def test_pruned_search_is_exact_where_the_bound_is_weak():
    generator = torch.Generator().manual_seed(3)  # isotropic rows: the principal subspace holds little
    bank, queries = torch.randn(800, 64, generator=generator), torch.randn(300, 64, generator=generator)
    squared, index = PrunedSearch(bank, exact_search(bank)).search(queries)
    assert torch.equal(index, torch.cdist(queries, bank).argmin(1))


def test_pruned_search_hands_blocks_with_too_many_pairs_to_the_exact_search(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(300, 32, generator=generator), torch.randn(200, 32, generator=generator)
    monkeypatch.setattr(PrunedSearch, "MAX_PAIR_SHARE", 0.0)
    calls = []
    exact = exact_search(bank)
    search = PrunedSearch(bank, lambda q: calls.append(len(q)) or exact(q))
    squared, index = search.search(queries)
    assert sum(calls) == len(queries) and search.exact_blocks >= 1
    assert torch.equal(index, torch.cdist(queries, bank).argmin(1))


def test_free_memory_reads_proc_and_the_cgroup_limit(monkeypatch, tmp_path):
    files = {"/proc/meminfo": "MemTotal: 9000 kB\nMemAvailable: 4000 kB\n",
             "/sys/fs/cgroup/memory.max": "3000000\n", "/sys/fs/cgroup/memory.current": "1000000\n"}
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path in files:
            copy = tmp_path / path.replace("/", "_")
            copy.write_text(files[path])
            return real_open(copy, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert free_memory(torch.device("cpu")) == 2_000_000  # the cgroup's room is below MemAvailable
    files["/sys/fs/cgroup/memory.max"] = "max\n"
    assert free_memory(torch.device("cpu")) == 4000 * 1024


def block_structured_samples(n: int, generator: torch.Generator):
    """(P=6, n, C=5) samples whose last K=2 dimensions are shared by cells of positions {0,1,2}, {3,4,5}."""
    cell_of, representative = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 3])
    fine = torch.randn(6, n, 3, generator=generator) + torch.randn(6, 1, 3, generator=generator)
    coarse = torch.randn(2, n, 2, generator=generator)[cell_of]
    mixing = torch.randn(6, 2, 3, generator=generator)
    return torch.cat([fine + coarse @ mixing, coarse], 2), cell_of, representative


def test_block_gaussians_are_the_full_covariance_gaussians():
    generator = torch.Generator().manual_seed(0)
    samples, cell_of, representative = block_structured_samples(40, generator)
    sums = BlockGaussianSums(3, cell_of, representative)
    for part in samples.split([15, 25], dim=1):  # streamed in two batches
        sums.add(part.clone())
    gaussians = sums.finish(ridge=0.01)
    mean, precision = gaussian_fit(samples.double(), ridge=0.01)
    torch.testing.assert_close(gaussians.mean.double(), mean, rtol=1e-5, atol=1e-5)
    blocks = block_precision(gaussians.whitening_fine, gaussians.coupling, gaussians.whitening_coarse[cell_of])
    torch.testing.assert_close(blocks.double(), precision, rtol=1e-3, atol=1e-3)
    test = block_structured_samples(7, generator)[0]  # samples share their cell's last K values, as PaDiM's do
    squared = block_mahalanobis(test - gaussians.mean[:, None], gaussians, cell_of, representative)
    torch.testing.assert_close(squared.double(), mahalanobis(test.double(), mean, precision), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        BlockGaussianSums(3, cell_of, representative).finish(0.01)


def test_inverse_cholesky_whitens():
    a = torch.randn(300, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spd = a @ a.transpose(1, 2) + torch.eye(6, dtype=torch.float64)
    w = inverse_cholesky_(spd.clone())
    assert torch.equal(w, w.tril())
    torch.testing.assert_close(w.transpose(1, 2) @ w, torch.linalg.inv(spd))


def decaying_features(n: int = 60, d: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, d)) * np.geomspace(10, 0.1, d) + rng.standard_normal(d)


def test_component_count_is_one_fewer_than_sklearn():
    x = decaying_features()
    singular_values = torch.linalg.svdvals(torch.from_numpy(x - x.mean(0)))
    for level in (0.5, 0.9, 0.97, 0.999):
        assert component_count(singular_values, level) == SklearnPCA(n_components=level).fit(x).n_components_ - 1


@pytest.mark.parametrize(("n", "d"), [(30, 80), (80, 30)])  # N×N and D×D Gram matrices
@pytest.mark.parametrize("by", ["level", "count"])
def test_pca_matches_sklearn_up_to_sign(n, d, by):
    x = decaying_features(n, d)
    pca = fit_pca(torch.from_numpy(x).float(), **({"level": 0.97} if by == "level" else {"n_components": 7}))
    reference = SklearnPCA(n_components=pca.components.shape[1]).fit(x.astype(np.float32).astype(np.float64))
    assert pca.components.dtype == torch.float64 and (by == "level" or pca.components.shape[1] == 7)
    np.testing.assert_allclose(pca.mean.numpy(), reference.mean_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pca.singular_values.numpy(), reference.singular_values_, rtol=1e-6)
    overlap = np.abs(pca.components.numpy().T @ reference.components_.T)  # same axes up to sign
    np.testing.assert_allclose(overlap, np.eye(pca.components.shape[1]), atol=1e-6)


def test_pca_checks_its_inputs_and_rank():
    with pytest.raises(ValueError, match="rows are equal"):
        fit_pca(torch.ones(5, 3), n_components=1)
    with pytest.raises(ValueError, match="not both"):
        fit_pca(torch.randn(5, 3), n_components=1, level=0.9)
    low_rank = torch.randn(10, 2, dtype=torch.float64) @ torch.randn(2, 30, dtype=torch.float64)
    assert fit_pca(low_rank, n_components=5).components.shape == (30, 2)  # no more axes than the rank


def test_kde_log_density_is_scipys_gaussian_kde():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(50, 4, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    queries = torch.cat([torch.randn(6, 4, generator=generator, dtype=torch.float64), points[:2]])
    expected = gaussian_kde(points.numpy().T, bw_method="scott").logpdf(queries.numpy().T)
    np.testing.assert_allclose(kde_log_density(queries, fit_kde(points)).numpy(), expected, rtol=1e-9)
    far = kde_log_density(queries + 1e3, fit_kde(points))
    assert torch.isfinite(far).all()  # a logsumexp: no underflow to -inf
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        kde_log_density(queries[:, :3], fit_kde(points))


def test_lookup_or_compute_computes_only_the_misses_and_stores_them():
    store, asked = {"a": 1, "c": 3}, []

    def compute(missing):
        asked.append(missing)
        return [10 * i for i in missing]

    values, missing = lookup_or_compute(["a", "b", "c", "d"], store.get, compute, store.__setitem__)
    assert values == [1, 10, 3, 30] and missing == [1, 3] and asked == [[1, 3]]
    assert store == {"a": 1, "b": 10, "c": 3, "d": 30}
    values, missing = lookup_or_compute(["a", "b"], store.get, compute, store.__setitem__)
    assert values == [1, 10] and missing == [] and len(asked) == 1  # all found: nothing computed
    with pytest.raises(ValueError, match="2 misses"):
        lookup_or_compute(["x", "y"], store.get, lambda missing: [0], store.__setitem__)
