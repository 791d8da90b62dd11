"""PatchCore against direct, unvectorised computations of the paper's and anomalib's definitions."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config

import ad.ops.coreset as coreset
import ad.ops.knn as knn
from ad.backbone import BackboneSpec
from ad.errors import ADError
from ad.models.base import Prediction
from ad.models.patchcore import Patchcore
from ad.postprocess import MapSmoother
from ad.run import run

DEVICE = torch.device("cpu")
RESNET18 = BackboneSpec("resnet18", weights="random")
TINY = ["dataset.image_size=64", "trainer.batch_size=8", "backbone.weights=random", "tracking=none",
        "dataset.n_train=12", "dataset.n_test_good=6", "dataset.n_test_defect=6"]


def make_cfg(*overrides: str):
    return compose_config("model=patchcore", *TINY, *overrides)


def anomalib_score(patches, bank, k):
    """anomalib's compute_anomaly_score for one image, spelled out: (1 - softmax(d)[0]) * s*, or s* for k=1."""
    distances = torch.cdist(patches, bank).min(1)
    if k == 1:
        return distances.values.max()
    worst = int(distances.values.argmax())
    score, m_star = distances.values[worst], distances.indices[worst]
    support = torch.cdist(bank[m_star][None], bank)[0].argsort()[:k]
    d = torch.linalg.vector_norm(patches[worst] - bank[support], dim=1)
    return (1 - torch.softmax(d, 0)[0]) * score


def batches(images: torch.Tensor, size: int = 4) -> list[dict]:
    return [{"image": chunk} for chunk in images.split(size)]


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = Patchcore(backbone=RESNET18, coreset_ratio=0.25)
    model.fit(batches(torch.randn(8, 3, 64, 64)), DEVICE)
    return model


def test_memory_bank_is_a_seeded_coreset_of_training_patches():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 64, 64)
    models = [Patchcore(backbone=RESNET18, coreset_ratio=0.1, seed=s) for s in (1, 1, 2)]
    for model in models:
        model.extractor.load_state_dict(models[0].extractor.state_dict())
        model.fit(batches(images), DEVICE)
    patches = models[0].patches(images).reshape(-1, models[0].memory_bank.shape[1])
    bank = models[0].memory_bank
    assert len(bank) == int(len(patches) * 0.1)
    exact = torch.cdist(bank, patches, compute_mode="donot_use_mm_for_euclid_dist")
    assert exact.min(1).values.max() < 1e-4  # every entry is a training patch
    assert torch.equal(bank, models[1].memory_bank) and not torch.equal(bank, models[2].memory_bank)


def test_a_coreset_ratio_sweep_reuses_the_cached_greedy_order(tmp_path, monkeypatch):
    from ad.cache import DiskCache

    torch.manual_seed(0)
    images = torch.randn(6, 3, 64, 64)

    def fitted_bank(ratio: float, cache: DiskCache | None) -> torch.Tensor:
        model = Patchcore(backbone=RESNET18, coreset_ratio=ratio, seed=1)
        model.extractor.load_state_dict(reference.extractor.state_dict())
        model.use_cache(cache)
        model.fit(batches(images), DEVICE)
        return model.memory_bank

    reference = Patchcore(backbone=RESNET18, seed=1)
    cache = DiskCache(tmp_path / "cache", max_gb=1)
    calls = []
    greedy = coreset.k_center_greedy
    monkeypatch.setattr(coreset, "k_center_greedy", lambda *a, **k: calls.append(a[1]) or greedy(*a, **k))
    large = fitted_bank(0.2, cache)
    small = fitted_bank(0.1, cache)  # a prefix of the cached order: no greedy run
    assert len(calls) == 1
    cache.flush()
    assert torch.equal(small, fitted_bank(0.1, None))  # the same bank as computed from scratch
    assert torch.equal(large, fitted_bank(0.2, None))
    fitted_bank(0.3, cache)  # longer than the cached order: computed again
    assert len(calls) == 4


def test_a_rerun_or_num_neighbors_sweep_reuses_the_cached_search_and_a_new_bank_does_not(tmp_path, monkeypatch):
    from ad.cache import DiskCache

    torch.manual_seed(0)
    train, test = torch.randn(6, 3, 64, 64), torch.randn(5, 3, 64, 64)
    reference = Patchcore(backbone=RESNET18, seed=1)
    searches = []
    search = Patchcore.nearest
    monkeypatch.setattr(Patchcore, "nearest", lambda self, q: searches.append(len(q)) or search(self, q))

    def scored(cache: DiskCache | None, **settings) -> Prediction:
        model = Patchcore(backbone=RESNET18, seed=1, **settings)
        model.extractor.load_state_dict(reference.extractor.state_dict())
        model.use_cache(cache)
        model.fit(batches(train), DEVICE)
        predictions = [model(batch["image"]) for batch in batches(test)]
        if cache is not None:
            cache.flush()
        return Prediction(scores=torch.cat([p.scores for p in predictions]),
                          maps=torch.cat([p.maps for p in predictions]))

    cache = DiskCache(tmp_path / "cache", max_gb=1)
    first = scored(cache, num_neighbors=3)
    assert searches  # the first run searches
    searches.clear()
    again, other_k = scored(cache, num_neighbors=3), scored(cache, num_neighbors=1)
    assert searches == []  # same bank, same images: the rerun and the num_neighbors sweep search nothing
    fresh = scored(None, num_neighbors=3)
    assert torch.equal(first.scores, again.scores) and torch.equal(first.maps, again.maps)
    torch.testing.assert_close(again.maps, fresh.maps)  # the cached distances are the searched ones
    torch.testing.assert_close(other_k.scores, scored(None, num_neighbors=1).scores)
    searches.clear()
    scored(cache, num_neighbors=3, coreset_ratio=0.2)  # another bank: searched again
    assert searches


def test_embedding_is_pooled_upsampled_and_concatenated(fitted):
    images = torch.randn(2, 3, 64, 64)
    layer2, layer3 = (F.avg_pool2d(f, 3, 1, 1) for f in fitted.extractor(images))
    layer3 = F.interpolate(layer3, size=layer2.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(fitted.embed(images), torch.cat([layer2, layer3], 1))


def low_rank_rows(count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Rows whose variance sits mostly in a few directions, as CNN patch features' does."""
    scales = torch.cat([torch.ones(6), torch.full((dim - 6,), 0.02)])
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(dim)))[0]
    return (torch.randn(count, dim, generator=generator) * scales) @ rotation + 3


def test_flat_search_on_cpu_is_pruned_and_follows_the_bank():
    generator = torch.Generator().manual_seed(2)
    bank, queries = low_rank_rows(500, 48, generator), low_rank_rows(300, 48, generator)
    model = Patchcore(backbone=RESNET18)
    model.memory_bank = bank
    distances, nearest = model.nearest(queries)
    expected = torch.cdist(queries, bank).min(1)
    assert model.search.pruned.pairs >= len(queries)
    assert torch.equal(nearest, expected.indices)
    torch.testing.assert_close(distances, expected.values, rtol=1e-4, atol=1e-4)
    model.memory_bank = bank[:200].clone()  # a new bank: the search is rebuilt, not reused
    assert torch.equal(model.nearest(queries)[1], torch.cdist(queries, bank[:200]).argmin(1))


def test_map_is_nearest_distance_upsampled_and_blurred(fitted):
    images = torch.randn(2, 3, 64, 64)
    embedding = fitted.embed(images)
    patches = embedding.flatten(2).transpose(1, 2)
    distances = torch.cdist(patches, fitted.memory_bank).min(2).values.view(2, *embedding.shape[-2:])
    prediction = fitted(images)
    torch.testing.assert_close(prediction.maps, MapSmoother(sigma=4.0)(distances, (64, 64)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_image_score_is_anomalibs_reweighting(fitted, k, monkeypatch):
    monkeypatch.setattr(fitted, "num_neighbors", k)
    images = torch.randn(3, 3, 64, 64)
    scores = fitted(images).scores
    patches = fitted.patches(images)
    expected = torch.stack([anomalib_score(p, fitted.memory_bank, k) for p in patches])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    if k == 1:  # no re-weighting: the largest nearest-neighbour distance
        max_patch = torch.cdist(patches, fitted.memory_bank).min(2).values.amax(1)
        torch.testing.assert_close(scores, max_patch, rtol=1e-4, atol=1e-4)


def test_scores_do_not_depend_on_the_batch(fitted):
    images = torch.randn(4, 3, 64, 64)
    together = fitted(images).scores
    alone = torch.cat([fitted(images[i:i + 1]).scores for i in range(4)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


def test_pickle_round_trip_gives_identical_scores(fitted):
    images = torch.randn(2, 3, 64, 64)
    before = fitted(images)  # builds the faiss index, which must not be pickled
    restored = pickle.loads(pickle.dumps(fitted))
    after = restored(images)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


def test_settings_and_state_rebuild_the_fitted_model(fitted):
    fitted(torch.randn(1, 3, 64, 64))  # the fitted model holds its search; the rebuilt one builds its own
    fresh = Patchcore(backbone=RESNET18, coreset_ratio=0.25)
    fresh.load_fitted_state(fitted.state_dict())
    images = torch.randn(3, 3, 64, 64)
    before, after = fitted(images), fresh(images)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"coreset_ratio": 0.0}, "model.coreset_ratio"),
    ({"coreset_ratio": 1.5}, "model.coreset_ratio"),
    ({"num_neighbors": 0}, "model.num_neighbors"),
    ({"index": "annoy"}, "model.index"),
    ({"projection_dim": 0}, "model.projection_dim"),
])
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ADError, match=key):
        Patchcore(backbone=RESNET18, **kwargs)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"coreset_ratio": 0.001}, "model.coreset_ratio"),  # 128 patches x 0.001 = no bank at all
    ({"coreset_ratio": 0.05}, "model.num_neighbors"),  # 6 bank entries < 9 neighbours
])
def test_too_small_a_bank_names_its_key(kwargs, key):
    model = Patchcore(backbone=RESNET18, **kwargs)
    with pytest.raises(ADError, match=key):
        model.fit(batches(torch.randn(2, 3, 64, 64)), DEVICE)


class Endless:
    """A training set that claims ten million batches but never builds them."""

    def __len__(self):
        return 10_000_000

    def __iter__(self):
        while True:
            yield {"image": torch.randn(2, 3, 64, 64)}


def test_a_bank_too_large_for_memory_fails_before_it_is_collected(monkeypatch):
    model = Patchcore(backbone=RESNET18)
    with pytest.raises(ADError, match="dataset.image_size.*GiB"):
        model.fit(Endless(), DEVICE)  # from the announced length, after one batch
    monkeypatch.setattr(knn, "free_memory", lambda device: 2**20)
    with pytest.raises(ADError, match="dataset.image_size"):  # no length: while collecting
        model.fit(iter(Endless()), DEVICE)


def test_default_backbone_is_the_papers():
    cfg = make_cfg()
    assert cfg.backbone.name == "wide_resnet50_2" and list(cfg.model.layers) == ["layer2", "layer3"]


def test_patchcore_separates_synthetic_defects(tmp_path):
    results = run(make_cfg("backbone=resnet18"), tmp_path)
    assert results["image_AUROC"] > 0.8 and results["pixel_AUROC"] > 0.8
