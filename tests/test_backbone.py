"""Backbone construction: layer mapping, weight sources and their failure messages."""

import pytest
import timm
import torch

from ad import backbone as bb
from ad.backbone import FeatureExtractor, layer_indices, resolve_precision
from ad.errors import ADError


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory):
    """A full timm/torchvision-style resnet18 state dict saved to disk, as a user would pass it."""
    torch.manual_seed(123)
    model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_layer_names_map_to_timm_feature_indices():
    assert layer_indices("resnet18", ["layer1", "layer2", "layer3"]) == [1, 2, 3]


@pytest.mark.parametrize(("name", "layers", "key"), [
    ("resnet18", ["layer9"], "model.layers"),
    ("no_such_net", ["layer1"], "backbone.name"),
])
def test_bad_backbone_settings_name_the_key(name, layers, key):
    with pytest.raises(ADError, match=key):
        layer_indices(name, layers)


def test_random_weights_give_requested_feature_maps():
    extractor = FeatureExtractor("resnet18", ["layer1", "layer3"], weights="random")
    features = extractor(torch.randn(2, 3, 64, 64))
    assert extractor.weights_source == "random"
    assert [f.shape for f in features] == [(2, 64, 16, 16), (2, 256, 4, 4)]
    assert all(f.dtype == torch.float32 for f in features)


def reference_features(state, images, layers=(1,)):
    """Features of a plain timm model holding exactly the given weights (unfused, NCHW)."""
    model = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=layers).eval()
    model.load_state_dict(state, strict=False)  # the truncated model has no layer4/fc
    with torch.no_grad():
        return model(images)


def test_checkpoint_file_is_loaded_exactly(resnet18_checkpoint):
    path, state = resnet18_checkpoint
    extractor = FeatureExtractor("resnet18", ["layer1", "layer3"], weights=str(path))
    assert extractor.weights_source == "file"
    images = torch.randn(2, 3, 64, 64)
    for ours, reference in zip(extractor(images), reference_features(state, images, (1, 3)), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_checkpoint_of_another_architecture_is_a_clear_error(resnet18_checkpoint):
    path, _ = resnet18_checkpoint
    with pytest.raises(ADError, match="does not fit backbone resnet50"):
        FeatureExtractor("resnet50", ["layer1"], weights=str(path))


def test_missing_checkpoint_file_names_the_key(tmp_path):
    with pytest.raises(ADError, match="backbone.weights"):
        FeatureExtractor("resnet18", ["layer1"], weights=str(tmp_path / "nope.pth"))


def test_unknown_weight_tag_lists_the_available_ones():
    with pytest.raises(ADError, match="backbone.tag.*tv_in1k"):
        FeatureExtractor("resnet18", ["layer1"], weights="imagenet", tag="no_such_tag")


def test_unreachable_hub_warns_loudly_and_records_random(monkeypatch, caplog):
    monkeypatch.setattr(bb, "_cached_hub_file", lambda hub_id: None)
    monkeypatch.setattr(bb, "_host_reachable", lambda url: False)
    extractor = FeatureExtractor("resnet18", ["layer1"], weights="imagenet", tag="tv_in1k")
    assert extractor.weights_source == "random"
    assert "RANDOMLY INITIALISED" in caplog.text and "backbone.weights=" in caplog.text


def test_cached_hub_weights_load_offline_as_imagenet(monkeypatch, resnet18_checkpoint):
    path, state = resnet18_checkpoint
    requested = []
    monkeypatch.setattr(bb, "_cached_hub_file", lambda hub_id: requested.append(hub_id) or str(path))
    extractor = FeatureExtractor("resnet18", ["layer1"], weights="imagenet", tag="tv_in1k")
    assert requested == ["timm/resnet18.tv_in1k"]
    assert extractor.weights_source == "imagenet"
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(extractor(images)[0], reference_features(state, images)[0], rtol=1e-4, atol=1e-4)


def test_backbone_stays_frozen_in_train_mode():
    extractor = FeatureExtractor("resnet18", ["layer1"], weights="random").train()
    assert not extractor.training and not extractor.model.training
    assert not any(p.requires_grad for p in extractor.parameters())


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(ADError, match="trainer.precision"):
        resolve_precision("fp8", cpu)


@pytest.mark.parametrize(("speedup", "expected"),
                         [(2.6, torch.bfloat16), (1.3, torch.bfloat16), (0.8, None), (0.0, None)])
def test_auto_precision_takes_bf16_on_a_cpu_only_where_it_measures_faster(monkeypatch, speedup, expected):
    monkeypatch.setattr(bb, "cpu_bf16_speedup", lambda: speedup)
    assert resolve_precision("auto", torch.device("cpu")) is expected


def test_bf16_speedup_is_measured_where_the_cpu_has_bf16_kernels(monkeypatch):
    bb.cpu_bf16_speedup.cache_clear()
    monkeypatch.setattr(bb, "native_cpu_bf16", lambda: False)
    assert bb.cpu_bf16_speedup() == 0.0  # no kernels: not even timed
    bb.cpu_bf16_speedup.cache_clear()
    monkeypatch.setattr(bb, "native_cpu_bf16", lambda: True)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert 0.05 < bb.cpu_bf16_speedup(repeats=1) < 20  # a real timing ratio, whatever this CPU is
    assert torch.equal(torch.rand(3), expected)  # measuring drew nothing from the seeded global RNG
    bb.cpu_bf16_speedup.cache_clear()


def test_bf16_speedup_is_measured_on_one_thread_and_restores_the_thread_count(monkeypatch):
    # All cores would let one busy core (the image prefetch, another sweep job) stall every parallel
    # convolution and flip auto precision from run to run; one thread keeps the ratio steady.
    threads_seen = []
    real_conv = bb.F.conv2d

    def conv2d(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return real_conv(*args, **kwargs)

    monkeypatch.setattr(bb, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(bb.F, "conv2d", conv2d)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bb.cpu_bf16_speedup.cache_clear()
        bb.cpu_bf16_speedup(repeats=2)
        assert threads_seen and set(threads_seen) == {1}
        assert len(threads_seen) == 2 + 2 * 2  # a first call per dtype, then fp32 and bf16 interleaved
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        bb.cpu_bf16_speedup.cache_clear()
