"""Backbone construction: layer mapping, weight sources and their failure messages."""

import os
import subprocess
import sys
import time

import pytest
import timm
import torch

from ad import backbone as bb
from ad import weights
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
    monkeypatch.setattr(weights, "_cached_hub_file", lambda hub_id: None)
    monkeypatch.setattr(weights, "_host_reachable", lambda url: False)
    extractor = FeatureExtractor("resnet18", ["layer1"], weights="imagenet", tag="tv_in1k")
    assert extractor.weights_source == "random"
    assert "RANDOMLY INITIALISED" in caplog.text and "backbone.weights=" in caplog.text


def test_cached_hub_weights_load_offline_as_imagenet(monkeypatch, resnet18_checkpoint):
    path, state = resnet18_checkpoint
    requested = []
    monkeypatch.setattr(weights, "_cached_hub_file", lambda hub_id: requested.append(hub_id) or str(path))
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


@pytest.mark.parametrize(("vendor", "flags", "expected"), [
    ("GenuineIntel", "avx512f avx512_bf16 amx_bf16 amx_tile", torch.bfloat16),  # Sapphire Rapids: AMX
    ("AuthenticAMD", "avx512f avx512_bf16", torch.bfloat16),  # Zen 4
    ("GenuineIntel", "avx512f avx512_bf16", None),  # Cooper Lake: bf16 ran slower than fp32
    ("AuthenticAMD", "avx2", None),
])
def test_auto_precision_on_a_cpu_follows_what_the_cpu_is(monkeypatch, vendor, flags, expected):
    monkeypatch.setattr(bb, "native_cpu_bf16", lambda: True)
    cpuinfo = f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 {flags}\n"
    assert bb.cpu_bf16_is_fast(cpuinfo) is (expected is torch.bfloat16)
    monkeypatch.setattr(bb, "cpu_bf16_is_fast", lambda: expected is torch.bfloat16)
    assert resolve_precision("auto", torch.device("cpu")) is expected


def test_auto_precision_needs_bf16_kernels(monkeypatch):
    monkeypatch.setattr(bb, "native_cpu_bf16", lambda: False)
    assert not bb.cpu_bf16_is_fast("vendor_id\t: GenuineIntel\nflags\t: amx_bf16 avx512_bf16\n")


def test_auto_precision_is_the_same_on_a_busy_machine():
    # The choice used to come from a timed probe, which a busy core could sway from run to run.
    bb.cpu_bf16_is_fast.cache_clear()
    idle = resolve_precision("auto", torch.device("cpu"))
    spin = "import time\nend = time.time() + 5\nwhile time.time() < end: pass"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range((os.cpu_count() or 1) + 1)]
    try:
        time.sleep(1)  # every core spinning
        bb.cpu_bf16_is_fast.cache_clear()
        assert resolve_precision("auto", torch.device("cpu")) is idle
    finally:
        for process in busy:
            process.kill()
            process.wait()


def test_backbone_spec_comes_from_the_config_and_round_trips():
    from helpers import compose_config

    cfg = compose_config("backbone=resnet50", "backbone.weights=random")
    spec = bb.BackboneSpec.from_config(cfg.backbone, precision="bf16", channels_last=False)
    assert spec == bb.BackboneSpec("resnet50", weights="random", tag="tv_in1k", precision="bf16", channels_last=False)
    assert bb.BackboneSpec.of(spec.to_dict()) == spec and bb.BackboneSpec.of(spec) is spec
    with pytest.raises(AttributeError):
        spec.name = "resnet18"  # frozen: a model's record of its backbone cannot drift from what built it


@pytest.mark.parametrize(("value", "key"), [({"name": "resnet18", "layers": ["layer1"]}, "backbone.layers"),
                                            ({"weights": "random"}, "backbone")])
def test_backbone_spec_refuses_what_it_does_not_know(value, key):
    with pytest.raises(ADError, match=key):
        bb.BackboneSpec.of(value)


def test_extractor_from_spec_matches_the_spec():
    spec = bb.BackboneSpec("resnet18", weights="random", precision="bf16", channels_last=False)
    extractor = FeatureExtractor.from_spec(spec, ["layer2"])
    assert (extractor.name, extractor.layers, extractor.precision, extractor.channels_last) == \
        ("resnet18", ["layer2"], "bf16", False)
    assert extractor.weights_source == "random"
