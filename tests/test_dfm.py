"""DFM against scikit-learn's PCA and a direct Gaussian log-likelihood, plus the run end to end."""

import math
import pickle

import numpy as np
import pytest
import torch
from helpers import TINY, compose_config
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA

from ad.backbone import BackboneSpec
from ad.errors import ADError
from ad.models.dfm import Dfm
from ad.run import run

DEVICE = torch.device("cpu")
BACKBONE = BackboneSpec("resnet18", weights="random")


def make_cfg(*overrides: str):
    return compose_config(*TINY, *overrides)


def fitted_model(score_type: str) -> tuple[Dfm, torch.Tensor]:
    torch.manual_seed(0)
    model = Dfm(backbone=BACKBONE, pooling_kernel_size=2, score_type=score_type)  # 64 px: 2x2 cells of layer3
    train = torch.randn(16, 3, 64, 64)
    model.fit([{"image": train[:6]}, {"image": train[6:]}], DEVICE)
    return model, train


@pytest.fixture(scope="module")
def fre():
    return fitted_model("fre")


@pytest.fixture(scope="module")
def nll():
    return fitted_model("nll")


def test_fre_is_distance_to_the_sklearn_pca_subspace(fre):
    model, train = fre
    features = model.embed(train).flatten(1).double().numpy()
    test = torch.randn(5, 3, 64, 64)
    x = model.embed(test).flatten(1).double().numpy()
    pca = PCA(n_components=model.components.shape[1], svd_solver="full").fit(features)
    expected = ((x - pca.inverse_transform(pca.transform(x))) ** 2).sum(1)
    np.testing.assert_allclose(model(test).scores.numpy(), expected, rtol=1e-3)


def test_fre_map_is_the_per_cell_error_upsampled(fre):
    model, _ = fre
    test = torch.randn(3, 3, 64, 64)
    error = model.reconstruction_error(model.embed(test))
    prediction = model(test)
    assert model.produces_maps and error.shape == (3, 2, 2) and prediction.maps.shape == (3, 64, 64)
    torch.testing.assert_close(prediction.scores, error.flatten(1).sum(1))
    expected = torch.nn.functional.interpolate(error[:, None], size=(64, 64), mode="bilinear")[:, 0]
    torch.testing.assert_close(prediction.maps, expected)


def test_nll_is_the_gaussian_log_likelihood_in_pca_space(nll):
    model, train = nll
    z_train = ((model.embed(train).flatten(1) - model.mean) @ model.components).double().numpy()
    test = torch.randn(5, 3, 64, 64)
    z = ((model.embed(test).flatten(1) - model.mean) @ model.components).double().numpy()
    gaussian = multivariate_normal(z_train.mean(0), np.cov(z_train, rowvar=False, bias=True))
    k = z.shape[1]
    expected = -2 * gaussian.logpdf(z) - k * math.log(2 * math.pi)  # anomalib drops the 2π term
    prediction = model(test)
    assert not model.produces_maps and prediction.maps is None
    np.testing.assert_allclose(prediction.scores.numpy(), expected, rtol=1e-3)


@pytest.mark.parametrize("which", ["fre", "nll"])
def test_scores_do_not_depend_on_the_batch(which, request):
    model, _ = request.getfixturevalue(which)
    images = torch.randn(4, 3, 64, 64)
    together = model(images).scores
    alone = torch.cat([model(images[i:i + 1]).scores for i in range(4)])
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["fre", "nll"])
def test_pickle_round_trip(which, request):
    model, _ = request.getfixturevalue(which)
    images = torch.randn(2, 3, 64, 64)
    clone = pickle.loads(pickle.dumps(model))
    assert clone.produces_maps == model.produces_maps
    torch.testing.assert_close(clone(images).scores, model(images).scores)


@pytest.mark.parametrize("which", ["fre", "nll"])
def test_settings_and_state_rebuild_the_fitted_model(which, request):
    model, _ = request.getfixturevalue(which)
    fresh = Dfm(backbone=BACKBONE, pooling_kernel_size=2, score_type=which)
    fresh.load_fitted_state(model.state_dict())
    images = torch.randn(3, 3, 64, 64)
    before, after = model(images), fresh(images)
    assert torch.equal(before.scores, after.scores)
    assert (before.maps is None and after.maps is None) or torch.equal(before.maps, after.maps)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"pca_level": 0.0}, "model.pca_level"),
    ({"pca_level": 1.5}, "model.pca_level"),
    ({"score_type": "mahalanobis"}, "model.score_type"),
    ({"layer": "layer9"}, "model.layer:"),
])
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ADError, match=key):
        Dfm(backbone=BACKBONE, **kwargs)


def test_bad_data_names_its_key():
    model = Dfm(backbone=BACKBONE)  # layer3 is 4x4 at 64 px (one pooled cell) and 2x2 at 32 px
    with pytest.raises(ADError, match="dataset: DFM needs at least 2 training images, got 1"):
        model.fit([{"image": torch.randn(1, 3, 64, 64)}], DEVICE)
    with pytest.raises(ADError, match="dataset: all 3 training images have the same features"):
        model.fit([{"image": torch.zeros(3, 3, 64, 64)}], DEVICE)
    with pytest.raises(ADError, match="model.pooling_kernel_size"):
        model.fit([{"image": torch.randn(4, 3, 32, 32)}], DEVICE)


def test_yaml_picks_resnet50_layer3():
    cfg = make_cfg("model=dfm")
    assert cfg.backbone.name == "resnet50" and cfg.model.layer == "layer3" and cfg.model.pca_level == 0.97


def test_fre_run_separates_synthetic_defects(tmp_path):
    # no pooling at 64 px keeps the 4x4 grid of layer3 that anomalib's kernel 4 gives at 256 px
    cfg = make_cfg("model=dfm", "backbone=resnet18", "model.pooling_kernel_size=1", "tracking=none",
                   "dataset.n_train=12", "dataset.n_test_good=6", "dataset.n_test_defect=6")
    results = run(cfg, tmp_path)
    assert results["image_AUROC"] > 0.7 and "pixel_AUROC" in results


def test_nll_run_is_image_level_only(tmp_path):
    cfg = make_cfg("model=dfm", "model.score_type=nll", "backbone=resnet18", "tracking=none",
                   "dataset.n_train=8", "dataset.n_test_good=4", "dataset.n_test_defect=4")
    results = run(cfg, tmp_path)
    assert "image_AUROC" in results and "pixel_AUROC" not in results and "pixel_AUPRO" not in results
