"""DFKDE against scipy's gaussian_kde on the same PCA features, plus the run end to end."""

import pickle

import numpy as np
import pytest
import torch
from helpers import TINY, compose_config
from scipy.stats import gaussian_kde

from ad.backbone import BackboneSpec
from ad.errors import ADError
from ad.models.dfkde import Dfkde, anomaly_probability, random_subset
from ad.run import run

DEVICE = torch.device("cpu")
BACKBONE = BackboneSpec("resnet18", weights="random")


def make_cfg(*overrides: str):
    return compose_config(*TINY, *overrides)


def fitted_model(scaling: str) -> tuple[Dfkde, torch.Tensor]:
    torch.manual_seed(0)
    model = Dfkde(backbone=BACKBONE, feature_scaling_method=scaling)
    train = torch.randn(24, 3, 32, 32)  # layer4 is pooled to 1x1 anyway: tiny images suffice
    model.fit([{"image": train[:10]}, {"image": train[10:]}], DEVICE)
    return model, train


@pytest.fixture(scope="module")
def scale():
    return fitted_model("scale")


@pytest.fixture(scope="module")
def norm():
    return fitted_model("norm")


@pytest.mark.parametrize("which", ["scale", "norm"])
def test_log_density_matches_scipy_gaussian_kde(which, request):
    model, train = request.getfixturevalue(which)
    z_train = model.project(model.embed(train)).numpy()
    assert z_train.shape == (24, 16)
    test = torch.cat([torch.randn(4, 3, 32, 32), train[:2]])  # unseen images and training images
    expected = gaussian_kde(z_train.T, bw_method="scott").logpdf(model.project(model.embed(test)).numpy().T)
    np.testing.assert_allclose(model.log_density(test).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_scaling_methods(scale, norm):
    model, train = scale
    assert model.project(model.embed(train)).norm(dim=1).max().item() == pytest.approx(1.0)
    model, train = norm
    z = model.project(model.embed(train))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(len(train), dtype=torch.float64))
    torch.testing.assert_close(model.points, z @ model.whiten)  # not shifted by their mean, unlike anomalib


def test_score_is_anomalibs_probability(scale):
    log_density = torch.tensor([-1000.0, -5.0, 12.0, 40.0], dtype=torch.float64)
    expected = 1 / (1 + np.exp(0.05 * (log_density.numpy() - 12)))
    np.testing.assert_allclose(anomaly_probability(log_density).numpy(), expected, rtol=1e-12)
    model, _ = scale
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(images).scores, anomaly_probability(model.log_density(images)).float())
    assert model(images).maps is None and not model.produces_maps


def test_far_images_do_not_underflow(scale):
    model, _ = scale
    far = model.log_density(torch.randn(2, 3, 32, 32) * 50)
    assert torch.isfinite(far).all()


def test_training_subset_is_seeded():
    features = torch.randn(50, 8)
    a, b, c = (random_subset(features, 20, seed) for seed in (1, 1, 2))
    assert a.shape == (20, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert random_subset(features, 50, 1) is features


def test_scores_do_not_depend_on_the_batch(scale):
    model, _ = scale
    images = torch.randn(4, 3, 32, 32)
    together = model(images).scores
    alone = torch.cat([model(images[i:i + 1]).scores for i in range(4)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)


def test_pickle_round_trip(norm):
    model, _ = norm
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(images).scores, model(images).scores)


@pytest.mark.parametrize("which", ["scale", "norm"])
def test_settings_and_state_rebuild_the_fitted_model(which, request):
    model, _ = request.getfixturevalue(which)
    fresh = Dfkde(backbone=BACKBONE, feature_scaling_method=which)
    fresh.load_fitted_state(model.state_dict())
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.log_density(images), fresh.log_density(images))
    assert torch.equal(model(images).scores, fresh(images).scores)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"feature_scaling_method": "minmax"}, "model.feature_scaling_method"),
    ({"n_pca_components": 600}, "model.n_pca_components"),
    ({"n_pca_components": 0}, "model.n_pca_components"),
    ({"max_training_points": 16}, "model.max_training_points"),
])
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ADError, match=key):
        Dfkde(backbone=BACKBONE, **kwargs)


def test_too_few_training_images_name_the_dataset():
    model = Dfkde(backbone=BACKBONE)
    with pytest.raises(ADError, match=r"dataset: .*model.n_pca_components \(16\), got 16"):
        model.fit([{"image": torch.randn(16, 3, 32, 32)}], DEVICE)


def test_run_is_image_level_only(tmp_path):
    cfg = make_cfg("model=dfkde", "tracking=none", "dataset.image_size=32", "dataset.n_train=20",
                   "dataset.n_test_good=4", "dataset.n_test_defect=4")
    results = run(cfg, tmp_path)
    assert cfg.backbone.name == "resnet18" and cfg.model.n_pca_components == 16
    assert "image_AUROC" in results and "pixel_AUROC" not in results and "pixel_AUPRO" not in results
