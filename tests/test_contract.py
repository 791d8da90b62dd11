"""The method contract of ``ad.models.base``: a method written from its docstring runs, and every method keeps it."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, compose_config
from omegaconf import OmegaConf

from ad.backbone import BackboneSpec, FeatureExtractor
from ad.bundle import load_bundle
from ad.cache import DiskCache
from ad.errors import ADError
from ad.models.base import AnomalyModel, Prediction, TrainableModel
from ad.predictions import read_predictions
from ad.run import build, make_model, run

SMALL = [*TINY, "tracking=none", "dataset.n_train=8", "dataset.n_test_good=4", "dataset.n_test_defect=4",
         "dataset.val_ratio=0.25"]
#: Per-method settings that keep building and fitting to seconds.
QUICK = {"ganomaly": ["model.n_features=8"], "dfkde": ["model.n_pca_components=4"], "patchcore": [], "cflow": [],
         "dfm": [], "padim": [], "stfpm": [], "reverse_distillation": []}


class MeanFeatureDistance(AnomalyModel):
    """Toy method: each position's distance to the mean training feature of one backbone layer; the image's max."""

    def __init__(self, backbone: BackboneSpec, layer: str = "layer2") -> None:
        super().__init__()
        self.extractor = FeatureExtractor.from_spec(backbone, [layer])
        self.register_buffer("mean", torch.empty(0))  # (C,) once fitted

    @torch.no_grad()
    def fit(self, batches, device: torch.device) -> None:
        features = torch.cat([self.extractor(batch["image"].to(device))[0] for batch in batches])
        self.mean = features.mean((0, 2, 3))

    def forward(self, images: torch.Tensor) -> Prediction:
        (features,) = self.extractor(images)
        distances = torch.linalg.vector_norm(features - self.mean.view(1, -1, 1, 1), dim=1, keepdim=True)
        maps = F.interpolate(distances, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


def toy_config(*overrides: str):
    cfg = compose_config(*SMALL, *overrides)
    cfg.model = OmegaConf.create({"_target_": f"{__name__}.MeanFeatureDistance", "layer": "layer2"})
    return cfg


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """The toy run through ``ad.run.run`` twice: test images scored 8 to a batch, then one at a time."""
    folder = tmp_path_factory.mktemp("toy")
    return {size: (run(toy_config(f"trainer.batch_size={size}"), folder / f"batch{size}"), folder / f"batch{size}")
            for size in (8, 1)}


def test_a_method_written_from_the_contract_runs_end_to_end(toy_runs):
    results, run_dir = toy_runs[8]
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["model"] == "meanfeaturedistance" and written["backbone"] == "resnet18"
    assert written["weights"] == "random" and written["n_test"] == 8
    assert 0 <= written["image_AUROC"] <= 1 and 0 <= written["pixel_AUROC"] <= 1  # maps were produced and scored
    rows = read_predictions(run_dir / "predictions.csv")
    assert len(rows) == 8 and sorted(r["target"] for r in rows) == ["0"] * 4 + ["1"] * 4
    assert all(float(r["score"]) > 0 for r in rows)


def test_the_toy_scores_do_not_depend_on_the_batch(toy_runs):
    (_, batched), (_, alone) = toy_runs[8], toy_runs[1]
    rows, single = read_predictions(batched / "predictions.csv"), read_predictions(alone / "predictions.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in single]
    torch.testing.assert_close(torch.tensor([float(r["score"]) for r in single]),
                               torch.tensor([float(r["score"]) for r in rows]), rtol=1e-5, atol=1e-6)


def test_the_bundle_refuses_a_method_from_outside_ad_models(toy_runs):
    _, run_dir = toy_runs[8]
    meta = json.loads((run_dir / "model" / "bundle.json").read_text())
    assert meta["backbone"] == BackboneSpec("resnet18", weights="random", precision=meta["precision"]).to_dict()
    with pytest.raises(ADError, match="not one of ad.models"):
        load_bundle(run_dir)


def fitted_method(name: str) -> tuple[AnomalyModel, torch.Tensor]:
    """A shipped method built as a run builds it, fitted on tiny synthetic images, and test images to score."""
    cfg = compose_config(*SMALL, f"model={name}", *QUICK[name])
    device = torch.device("cpu")
    model = make_model(cfg, device, "fp32")
    dataset = build(cfg.dataset, "dataset")
    train = torch.stack([item["image"] for item in dataset.train_set(None)])
    batches = [{"image": train[:4]}, {"image": train[4:]}]
    if isinstance(model, TrainableModel):  # untrained weights keep the contract as well as trained ones
        model.eval().on_train_end(batches, device)
    else:
        model.fit(batches, device)
    test = torch.stack([dataset.test_set(None)[i]["image"] for i in range(len(dataset.test))])
    return model.eval(), test


@pytest.mark.parametrize("name", sorted(QUICK))
def test_every_method_scores_an_image_the_same_alone_or_in_a_batch(name):
    model, images = fitted_method(name)
    with torch.no_grad():
        together = model(images)
        alone = [model(image[None]) for image in images]
    scale = together.scores.abs().max()
    torch.testing.assert_close(torch.cat([p.scores for p in alone]), together.scores, rtol=1e-4, atol=1e-5 * scale)
    assert (together.maps is None) == (not model.produces_maps)
    if together.maps is not None:
        torch.testing.assert_close(torch.cat([p.maps for p in alone]), together.maps, rtol=1e-4,
                                   atol=1e-5 * together.maps.abs().max())


def test_only_methods_that_declare_a_backbone_get_one():
    for name in QUICK:
        model = make_model(compose_config(*SMALL, f"model={name}", *QUICK[name]), torch.device("cpu"), "fp32")
        extractors = [m for m in model.modules() if isinstance(m, FeatureExtractor)]
        assert bool(extractors) == model.uses_backbone, name
        assert model.weights_source == ("random" if model.uses_backbone else "none")


def test_a_cache_is_given_explicitly_and_never_copied(tmp_path):
    model = make_model(compose_config(*SMALL, "model=patchcore", "backbone=resnet18"), torch.device("cpu"), "fp32")
    cache = DiskCache(tmp_path)
    model.use_cache(cache)
    assert model.extractor.cache is cache
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.extractor.cache is None and twin._cache is None
    model.use_cache(None)
    assert model.extractor.cache is None and model._cache is None


def test_a_bundle_record_written_before_the_typed_spec_rebuilds_its_model():
    from ad.bundle import build_model

    backbone = {"name": "resnet18", "weights": "imagenet", "tag": "tv_in1k", "precision": "fp32",
                "channels_last": True}  # the dict every bundle.json holds
    padim = build_model({"method": {"class": "ad.models.padim.Padim", "settings": {"n_features": 10}},
                         "backbone": backbone})
    assert padim.extractor.weights_source == "random"  # the bundle's tensors replace the weights
    extractor = padim.extractor
    assert (extractor.name, extractor.precision, extractor.channels_last) == ("resnet18", "fp32", True)
    ganomaly = build_model({"method": {"class": "ad.models.ganomaly.Ganomaly", "settings": {"image_size": 32}},
                            "backbone": None})
    assert not ganomaly.uses_backbone and ganomaly.weights_source == "none"
