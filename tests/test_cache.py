"""The on-disk cache of decoded images and backbone features: correct, atomic, bounded."""

import os
import threading
import time

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ad.backbone import FeatureExtractor
from ad.cache import DiskCache, digest
from ad.data import Synthetic
from ad.launch import CONF_DIR
from ad.run import run


def test_round_trip_and_miss(tmp_path):
    cache = DiskCache(tmp_path)
    assert cache.load("features", "ab12") is None
    cache.save("features", "ab12", [torch.arange(4.0), torch.ones(2, 2)])
    a, b = cache.load("features", "ab12")
    assert torch.equal(a, torch.arange(4.0)) and torch.equal(b, torch.ones(2, 2))
    assert not list(tmp_path.rglob("*.tmp"))


def test_damaged_entry_is_a_miss_and_is_removed(tmp_path):
    cache = DiskCache(tmp_path)
    cache.save("features", "cd34", torch.zeros(3))
    path = next(tmp_path.rglob("cd34.pt"))
    path.write_bytes(path.read_bytes()[:10])
    assert cache.load("features", "cd34") is None and not path.exists()


def test_eviction_drops_least_recently_used_first(tmp_path):
    cache = DiskCache(tmp_path, max_gb=0)
    for i, key in enumerate(["aa01", "bb02", "cc03"]):
        cache.save("features", key, torch.zeros(1000))
        os.utime(next(tmp_path.rglob(f"{key}.pt")), (1000 + i, 1000 + i))
    size = next(tmp_path.rglob("aa01.pt")).stat().st_size
    cache.max_bytes = 2 * size
    cache.evict()
    assert sorted(p.stem for p in tmp_path.rglob("*.pt")) == ["bb02", "cc03"]


def test_stale_temp_files_of_killed_writers_are_cleaned(tmp_path):
    cache = DiskCache(tmp_path)
    cache.save("features", "ee05", torch.zeros(1))
    leftover = next(tmp_path.rglob("ee05.pt")).with_name("ff06.pt.999.tmp")
    leftover.write_bytes(b"half")
    assert cache.load("features", "ff06") is None  # a half-written file is never read
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    cache.evict()
    assert not leftover.exists()


def test_concurrent_writers_and_readers_never_see_partial_entries(tmp_path):
    cache, value, errors = DiskCache(tmp_path), torch.randn(256, 1024), []

    def writer():
        for _ in range(5):
            cache.save("features", "0f0f", value)

    def reader():
        for _ in range(20):
            got = cache.load("features", "0f0f")
            if got is not None and not torch.equal(got, value):
                errors.append("partial read")

    threads = [threading.Thread(target=f) for f in (writer, writer, reader, reader)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and torch.equal(cache.load("features", "0f0f"), value)


def test_digest_separates_parts():
    assert digest("ab", "c") != digest("a", "bc")


def test_cached_features_equal_computed_ones_and_skip_the_backbone(tmp_path, monkeypatch):
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], weights="random")
    images = torch.randn(4, 3, 64, 64)
    expected = extractor(images)
    extractor.use_cache(DiskCache(tmp_path))
    first = extractor(images[:3])
    calls = []
    compute = extractor.compute
    monkeypatch.setattr(extractor, "compute", lambda x, **kw: calls.append(len(x)) or compute(x, **kw))
    second = extractor(images)  # three hits, one miss
    assert calls == [1]
    for level in range(2):
        torch.testing.assert_close(first[level], expected[level][:3])
        torch.testing.assert_close(second[level], expected[level])


def test_bf16_features_are_cached_as_computed_and_read_back_exactly(tmp_path):
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], weights="random", precision="bf16")
    images = torch.randn(2, 3, 64, 64)
    expected = extractor(images)  # no cache: the fp32 conversion of the bf16 maps
    extractor.use_cache(DiskCache(tmp_path))
    extractor(images)
    extractor.cache.flush()  # the writes are asynchronous
    key = digest("features", extractor.identity(), images[0].permute(1, 2, 0).contiguous().numpy().tobytes())
    assert [level.dtype for level in extractor.cache.load("features", key)] == [torch.bfloat16] * 2  # half the bytes
    for got, want in zip(extractor(images), expected, strict=True):  # now read back from disk
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_native_features_are_the_bf16_maps_cold_and_warm(tmp_path):
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], weights="random", precision="bf16")
    images = torch.randn(2, 3, 64, 64)
    expected = extractor(images)
    extractor.use_cache(DiskCache(tmp_path))
    for _ in ("computed", "read back"):
        native = extractor(images, fp32=False)
        assert [level.dtype for level in native] == [torch.bfloat16] * 2
        assert all(torch.equal(got.float(), want) for got, want in zip(native, expected, strict=True))
        extractor.cache.flush()


def test_feature_keys_change_with_weights_and_numerics():
    a = FeatureExtractor("resnet18", ["layer1"], weights="random")
    torch.manual_seed(7)
    b = FeatureExtractor("resnet18", ["layer1"], weights="random")
    c = FeatureExtractor("resnet18", ["layer1"], weights="random", precision="bf16")
    assert len({a.identity(), b.identity(), c.identity()}) == 3


def test_decoded_images_are_reused_until_the_file_changes(tmp_path):
    dataset = Synthetic(image_size=32, n_train=2, n_test_good=1, n_test_defect=1, root=str(tmp_path / "data"))
    cache = DiskCache(tmp_path / "cache")
    fresh = dataset.test_set()[1]
    cached = dataset.test_set(cache)
    assert torch.equal(cached[1]["image"], fresh["image"]) and torch.equal(cached[1]["mask"], fresh["mask"])
    assert torch.equal(cached[1]["image"], fresh["image"])  # served from the cache now
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    path = dataset.test[1].image
    os.utime(path, (time.time() + 5, time.time() + 5))  # a rewritten file has a new signature
    cached[1]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2


def test_damaged_array_entry_is_a_miss_and_is_removed(tmp_path):
    cache = DiskCache(tmp_path)
    cache.save_array("images", "k", np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    np.testing.assert_array_equal(cache.load_array("images", "k"), np.arange(12).reshape(2, 2, 3))
    path = next(tmp_path.rglob("*.npy"))
    path.write_bytes(path.read_bytes()[:-5])
    assert cache.load_array("images", "k") is None and not path.exists()


def test_second_run_reuses_features_and_gives_identical_results(tmp_path, monkeypatch):
    overrides = ["tracking=none", "backbone.weights=random", "dataset.image_size=64", "dataset.n_train=8",
                 "dataset.n_test_good=4", "dataset.n_test_defect=4", f"runtime.cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        uncached = compose("config", overrides=[*overrides, "runtime.feature_cache=false"])
    first = run(cfg, tmp_path / "a")
    calls = []
    compute = FeatureExtractor.compute
    monkeypatch.setattr(FeatureExtractor, "compute", lambda self, x: calls.append(len(x)) or compute(self, x))
    second = run(cfg, tmp_path / "b")
    assert calls == []
    reference = run(uncached, tmp_path / "c")
    for key in ("image_AUROC", "image_F1", "pixel_AUROC", "pixel_AUPRO"):
        assert first[key] == second[key] == pytest.approx(reference[key], abs=1e-6)


def test_background_writes_are_readable_at_once_and_land_after_flush(tmp_path):
    cache = DiskCache(tmp_path)
    cache.save_async("features", "ab99", torch.ones(3))
    assert torch.equal(cache.load("features", "ab99"), torch.ones(3))
    cache.flush()
    assert torch.equal(DiskCache(tmp_path).load("features", "ab99"), torch.ones(3))


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are a Unix call")
def test_background_writes_run_at_the_callers_priority(tmp_path):
    # flush() waits for this thread: lowered, it would stall the run on a busy machine.
    cache = DiskCache(tmp_path)
    cache.save_async("features", "cd01", torch.ones(3))  # starts the writer thread

    def own_priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = own_priority()
    assert cache._writer.submit(own_priority).result() == before
    assert own_priority() == before
    cache.flush()


def test_torch_reporting_a_full_disk_as_a_runtime_error_turns_writing_off(tmp_path, monkeypatch, caplog):
    import ad.cache

    def full(value, file):
        raise RuntimeError("write(): fd 37 failed with No space left on device")  # torch's legacy writer

    monkeypatch.setattr(ad.cache, "_torch_save", full)
    cache = DiskCache(tmp_path)
    cache.save("features", "ff01", torch.ones(2))
    assert cache.writes_off and not list(tmp_path.rglob("*.tmp"))

    def bug(value, file):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(ad.cache, "_torch_save", bug)
    with pytest.raises(RuntimeError, match="some other failure"):
        DiskCache(tmp_path / "other").save("features", "ff02", torch.ones(2))
