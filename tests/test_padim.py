"""PaDiM against a direct, unvectorised computation of the paper's statistics."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import mahalanobis

from ad.backbone import BackboneSpec
from ad.errors import ADError
from ad.models.padim import COV_EPS, INV_EPS, Padim
from ad.ops.upsample import nearest_index, pick_channels

RESNET18 = BackboneSpec("resnet18", weights="random")

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = Padim(backbone=RESNET18, n_features=20)
    train = torch.randn(10, 3, 64, 64)
    model.fit([{"image": train[:6]}, {"image": train[6:]}], DEVICE)  # two batches: streaming sums
    return model, train


def test_embedding_is_concatenate_upsample_then_index(fitted):
    model, train = fitted
    features = model.extractor(train[:2])
    grid = features[0].shape[-2:]
    full = torch.cat([features[0]] + [F.interpolate(f, size=grid, mode="nearest") for f in features[1:]], 1)
    expected = full[:, model.channel_idx].flatten(2).permute(2, 0, 1)  # (P, B, C)
    torch.testing.assert_close(model.embed(train[:2]), expected)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_picked_channels_are_the_kept_channels_position_major(layout, dtype):
    feature = torch.randn(3, 40, 5, 7).to(dtype).contiguous(memory_format=layout)
    keep = torch.tensor([0, 3, 4, 17, 39])
    picked = pick_channels(feature, keep)
    assert picked.shape == (5, 7, 3, 5)
    assert torch.equal(picked, feature[:, keep].permute(2, 3, 0, 1))


@pytest.mark.parametrize(("size_in", "size_out"), [(16, 64), (17, 64), (32, 63), (9, 57), (64, 64), (40, 7)])
def test_nearest_index_picks_what_interpolate_picks(size_in, size_out):
    rows = torch.arange(size_in, dtype=torch.float32).view(1, 1, size_in, 1)
    expected = F.interpolate(rows, size=(size_out, 1), mode="nearest").flatten().long()
    assert torch.equal(nearest_index(size_in, size_out), expected)


def test_odd_image_size_embeds_like_interpolate():
    torch.manual_seed(0)
    model = Padim(backbone=RESNET18, n_features=30)
    images = torch.randn(2, 3, 90, 90)  # layer grids 23, 12, 6: not multiples of each other
    features = model.extractor(images)
    grid = features[0].shape[-2:]
    full = torch.cat([features[0]] + [F.interpolate(f, size=grid, mode="nearest") for f in features[1:]], 1)
    torch.testing.assert_close(model.embed(images), full[:, model.channel_idx].flatten(2).permute(2, 0, 1))


def test_gaussian_per_position_matches_numpy(fitted):
    model, train = fitted
    emb = model.embed(train).double().numpy()  # (P, N, C)
    positions = [0, 37, 38, emb.shape[0] - 1]
    precision = model.precision(torch.tensor(positions)).double().numpy()
    for p, inverse in zip(positions, precision, strict=True):
        cov = np.cov(emb[p], rowvar=False) + (COV_EPS + INV_EPS) * np.eye(emb.shape[2])
        np.testing.assert_allclose(model.mean[p].numpy(), emb[p].mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(inverse, np.linalg.inv(cov), rtol=2e-3, atol=2e-3)
    for whitening in (model.whitening_fine, model.whitening_coarse):  # inverse Cholesky factors
        assert torch.equal(whitening, whitening.tril())


def _assert_distances_are_mahalanobis(model, train, image, positions=None):
    emb = model.embed(train).double().numpy()
    test_emb = model.embed(image)[:, 0].double().numpy()  # (P, C)
    distances = model.distances(image).flatten()
    assert distances.numel() == emb.shape[0]
    for p in positions or range(emb.shape[0]):
        cov = np.cov(emb[p], rowvar=False) + (COV_EPS + INV_EPS) * np.eye(emb.shape[2])
        expected = mahalanobis(test_emb[p], emb[p].mean(0), np.linalg.inv(cov))
        assert distances[p].item() == pytest.approx(expected, rel=1e-3), p


def test_distance_is_mahalanobis_to_the_training_gaussian(fitted):
    model, train = fitted
    assert 0 < model.n_fine < len(model.channel_idx)  # both blocks of the split are exercised
    _assert_distances_are_mahalanobis(model, train, torch.randn(1, 3, 64, 64), positions=(0, 5, 37, 255))


def test_distance_is_mahalanobis_on_grids_that_are_not_multiples_of_each_other():
    torch.manual_seed(1)
    model = Padim(backbone=RESNET18, n_features=12)
    train = torch.randn(16, 3, 42, 42)  # layer grids 11, 6, 3: irregular cells of layer3
    model.fit([{"image": train[:9]}, {"image": train[9:]}], DEVICE)
    assert model.distances(train[:2]).shape == (2, 11, 11)
    _assert_distances_are_mahalanobis(model, train, torch.randn(1, 3, 42, 42))


@pytest.mark.parametrize("kept", ["only earlier layers", "only the last layer"])
def test_distance_is_mahalanobis_when_one_block_is_empty(kept):
    torch.manual_seed(2)
    model = Padim(backbone=RESNET18, n_features=6)
    model.channel_idx = torch.tensor([1, 9, 70, 100, 150, 190]) if kept == "only earlier layers" \
        else torch.tensor([200, 250, 300, 301, 400, 447])
    assert model.n_fine == (6 if kept == "only earlier layers" else 0)
    train = torch.randn(12, 3, 32, 32)
    model.fit([{"image": train}], DEVICE)
    _assert_distances_are_mahalanobis(model, train, torch.randn(1, 3, 32, 32))


def test_map_is_image_sized_and_score_is_its_maximum(fitted):
    model, _ = fitted
    prediction = model(torch.randn(3, 3, 64, 64))
    assert prediction.maps.shape == (3, 64, 64)
    torch.testing.assert_close(prediction.scores, prediction.maps.flatten(1).amax(1))


def test_scores_do_not_depend_on_the_batch(fitted):
    model, _ = fitted
    images = torch.randn(4, 3, 64, 64)
    together = model(images)
    alone = torch.cat([model(images[i:i + 1]).scores for i in range(4)])
    torch.testing.assert_close(alone, together.scores, rtol=1e-5, atol=1e-5)


def test_settings_and_state_rebuild_the_fitted_model(fitted):
    model, _ = fitted
    fresh = Padim(backbone=RESNET18, n_features=20)
    fresh.load_fitted_state(model.state_dict())
    images = torch.randn(3, 3, 64, 64)
    before, after = model(images), fresh(images)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


def test_paper_channel_defaults_and_bounds():
    assert Padim(backbone=RESNET18).channel_idx.numel() == 100
    with pytest.raises(ADError, match="model.n_features"):
        Padim(backbone=BackboneSpec("resnet50", weights="random"))
    with pytest.raises(ADError, match="model.n_features"):
        Padim(backbone=RESNET18, n_features=1000)


def test_channel_subset_is_seeded():
    a = Padim(backbone=RESNET18, seed=1).channel_idx
    b = Padim(backbone=RESNET18, seed=1).channel_idx
    c = Padim(backbone=RESNET18, seed=2).channel_idx
    assert torch.equal(a, b) and not torch.equal(a, c)
