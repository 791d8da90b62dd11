"""A backbone built once is recalled from the feature cache: same identity, shapes, weights and random state."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import ad.backbone
from ad.backbone import FeatureExtractor
from ad.backbone_record import RECORDS, WEIGHTS
from ad.cache import DiskCache
from ad.models.padim import Padim

LAYERS = ["layer1", "layer2"]


def built_and_recalled(cache: DiskCache, seed: int = 0, **settings) -> tuple[FeatureExtractor, FeatureExtractor]:
    """One extractor built (and recorded) and one recalled, each made from the same random state."""
    torch.manual_seed(seed)
    built = FeatureExtractor("resnet18", LAYERS, records=cache, **settings)
    cache.flush()
    torch.manual_seed(seed)
    recalled = FeatureExtractor("resnet18", LAYERS, records=cache, **settings)
    return built, recalled


def no_building(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was built")

    monkeypatch.setattr(ad.backbone, "build_feature_model", refuse)


def test_a_recalled_backbone_is_not_built_and_equals_the_built_one(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path)
    torch.manual_seed(0)
    built = FeatureExtractor("resnet18", LAYERS, weights="random", records=cache)
    after_build = torch.rand(3)  # what the run draws next
    cache.flush()
    no_building(monkeypatch)
    torch.manual_seed(0)
    recalled = FeatureExtractor("resnet18", LAYERS, weights="random", records=cache)
    assert torch.equal(torch.rand(3), after_build)  # the random state is left as the build left it
    assert recalled.model is None
    assert (recalled.identity(), recalled.channels, recalled.reductions, recalled.weights_source) == (
        built.identity(), built.channels, built.reductions, "random")
    state, expected = recalled.state_dict(), built.state_dict()  # the bundle's weights come from the cache
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert recalled.model is None


def test_a_recalled_backbone_builds_the_same_network_when_it_must_compute(tmp_path):
    built, recalled = built_and_recalled(DiskCache(tmp_path), weights="random")
    torch.manual_seed(99)  # a later build must not depend on the state at that time
    images = torch.randn(2, 3, 64, 64)
    for got, want in zip(recalled(images), built(images), strict=True):
        assert torch.equal(got, want)
    assert isinstance(recalled.model, nn.Module)


def test_another_random_state_another_weights_file_or_a_changed_file_is_built(tmp_path):
    cache = DiskCache(tmp_path)
    _, recalled = built_and_recalled(cache, seed=1, weights="random")
    assert recalled.model is None
    torch.manual_seed(2)
    assert FeatureExtractor("resnet18", LAYERS, weights="random", records=cache).model is not None

    torch.manual_seed(5)
    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(weights, checkpoint)
    from_file, recalled_file = built_and_recalled(cache, weights=str(checkpoint))
    assert recalled_file.model is None and recalled_file.weights_source == "file"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, checkpoint)
    changed = FeatureExtractor("resnet18", LAYERS, weights=str(checkpoint), records=cache)
    assert changed.model is not None and changed.identity() != from_file.identity()


def test_evicted_weights_are_built_again_for_the_bundle(tmp_path):
    cache = DiskCache(tmp_path)
    built, recalled = built_and_recalled(cache, weights="random")
    for entry in (tmp_path / f"{WEIGHTS}-v1").rglob("*.pt"):
        entry.unlink()
    state = recalled.state_dict()
    assert isinstance(recalled.model, nn.Module)
    assert all(torch.equal(state[k], v) for k, v in built.state_dict().items())


def test_imagenet_weights_that_fell_back_to_random_are_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("ad.weights._cached_hub_file", lambda hub_id: None)
    cache = DiskCache(tmp_path)
    FeatureExtractor("resnet18", LAYERS, weights="imagenet", records=cache)
    cache.flush()
    assert not (tmp_path / f"{RECORDS}-v1").exists()  # the next run may find the weights: it looks again


def test_a_recalled_method_fits_and_scores_like_a_built_one(tmp_path):
    cache = DiskCache(tmp_path)
    spec = {"name": "resnet18", "weights": "random", "records": cache}
    images = torch.randn(6, 3, 64, 64)
    predictions = []
    for _ in range(2):
        torch.manual_seed(3)
        model = Padim(ad.backbone.BackboneSpec(**spec), n_features=20)
        model.use_cache(cache)
        model.fit([{"image": images}], torch.device("cpu"))
        cache.flush()
        predictions.append(model(images))
    assert model.extractor.model is None  # the second fit read every feature from the cache
    assert torch.equal(predictions[0].scores, predictions[1].scores)


@pytest.mark.parametrize("method", [["model=padim"], ["model=patchcore", "backbone=resnet18"]])
def test_a_warm_run_imports_neither_timm_nor_dynamo_nor_faiss(tmp_path, method):
    """The point of the record: the start-up of a run whose features are cached (see benchmarks/README.md)."""
    script = f"""
import json, sys
from hydra import compose, initialize_config_dir
from ad.launch import CONF_DIR
from ad.run import run
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides={method} + ["tracking=none", "backbone.weights=random", "dataset.image_size=64",
                                       "dataset.n_train=8", "dataset.n_test_good=4", "dataset.n_test_defect=4",
                                       "runtime.cache_dir={tmp_path / 'cache'}"])
results = run(cfg, __import__("pathlib").Path(sys.argv[1]))
print(json.dumps({{"auroc": results["image_AUROC"],
                  "imported": sorted(m for m in ("timm", "torchvision", "torch._dynamo", "faiss")
                                    if m in sys.modules)}}))
"""
    outputs = [json.loads(subprocess.run([sys.executable, "-c", script, str(tmp_path / f"run{i}")], check=True,
                                         capture_output=True, text=True).stdout.splitlines()[-1]) for i in range(2)]
    assert outputs[0]["imported"]  # the cold run built its backbone
    assert outputs[1]["imported"] == [] and outputs[1]["auroc"] == pytest.approx(outputs[0]["auroc"], abs=0)


def test_a_trained_method_whose_teacher_is_recalled_trains_and_scores_exactly_as_when_built(tmp_path, monkeypatch):
    """The student's initial weights are drawn after the teacher's build: the restored random state keeps them."""
    from hydra import compose, initialize_config_dir

    from ad.launch import CONF_DIR
    from ad.run import run

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=stfpm", "tracking=none", "backbone.weights=random", "dataset.image_size=64", "dataset.n_train=8",
            "dataset.n_test_good=4", "dataset.n_test_defect=4", "trainer.max_epochs=1",
            f"runtime.cache_dir={tmp_path / 'cache'}"])
    built = run(cfg, tmp_path / "built")
    no_building(monkeypatch)
    recalled = run(cfg, tmp_path / "recalled")
    for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert recalled[key] == built[key]
    student = "student.conv1.weight"
    from safetensors.torch import load_file

    tensors = [load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("built", "recalled")]
    assert tensors[0].keys() == tensors[1].keys() and torch.equal(tensors[0][student], tensors[1][student])


def test_imagenet_weights_from_the_hub_cache_are_recalled_while_their_file_is_there(tmp_path, monkeypatch):
    torch.manual_seed(7)
    hub_file = tmp_path / "hub" / "model.pth"
    hub_file.parent.mkdir()
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), hub_file)
    monkeypatch.setattr("ad.weights._cached_hub_file", lambda hub_id: str(hub_file))
    cache = DiskCache(tmp_path / "cache")
    built, recalled = built_and_recalled(cache, weights="imagenet")
    assert recalled.model is None and recalled.weights_source == "imagenet"
    assert recalled.identity() == built.identity()
    hub_file.unlink()  # the weights are gone: the next run must look for them again, not recall
    torch.manual_seed(0)
    assert recall_of(cache, "imagenet") is None


def recall_of(cache: DiskCache, weights: str):
    from ad.backbone_record import build_key, recall

    return recall(cache, build_key("resnet18", LAYERS, weights, "tv_in1k"))
