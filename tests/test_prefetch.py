"""The start-up prefetch: a side process decodes a run's images into the cache, never anything else."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import compose_config

from ad.cache import DiskCache
from ad.data import MVTecAD
from ad.data.base import cached_decoded, decode
from ad.data.synthetic import make_mvtec_layout
from ad.runtime.prefetch import prefetch_images, spec, wanted, warm


@pytest.fixture
def mvtec_cfg(tmp_path):
    make_mvtec_layout(tmp_path / "data", "widget", n_train=4, n_test_good=2, n_test_defect=2, image_size=48, seed=0)
    return compose_config("dataset=mvtec", f"dataset.root={tmp_path / 'data'}", "dataset.category=widget",
                          "dataset.image_size=32", f"runtime.cache_dir={tmp_path / 'cache'}")


def test_side_process_fills_the_cache_with_what_the_run_would_decode(mvtec_cfg, tmp_path):
    with prefetch_images(mvtec_cfg) as process:
        assert process is not None and process.wait(timeout=120) == 0
    dataset = MVTecAD(root=str(tmp_path / "data"), category="widget", image_size=32)
    cache = DiskCache(tmp_path / "cache")
    for sample in [*dataset.train, *dataset.test]:
        cached_image, cached_mask = cached_decoded(sample, 32, cache)
        image, mask = decode(sample, 32)
        np.testing.assert_array_equal(cached_image, image)
        np.testing.assert_array_equal(cached_mask, mask)


def test_decoding_needs_no_torch(mvtec_cfg):
    """The side process must start fast: no torch import, which costs seconds on these cores."""
    code = ("import sys; from ad.runtime.prefetch import warm; n = warm(sys.stdin.read()); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(n)")
    done = subprocess.run([sys.executable, "-c", code], input=spec(mvtec_cfg), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8"]  # 4 train + 4 test images, none cached before


def test_second_warm_decodes_nothing(mvtec_cfg):
    assert warm(spec(mvtec_cfg)) == 8
    assert warm(spec(mvtec_cfg)) == 0


def test_a_corrupt_image_is_left_for_the_run_to_report(mvtec_cfg, tmp_path):
    bad = sorted((tmp_path / "data" / "widget" / "train" / "good").iterdir())[0]
    bad.write_bytes(b"not a png")
    assert warm(spec(mvtec_cfg)) == 7


def test_off_without_the_cache_or_when_asked():
    assert wanted(compose_config())
    assert not wanted(compose_config("runtime.feature_cache=false"))
    assert not wanted(compose_config("runtime.prefetch=false"))


def test_never_downloads():
    assert "download: false" in spec(compose_config("dataset=mvtec", "dataset.download=true"))


def test_the_side_process_runs_at_the_configured_niceness():
    assert "niceness: 10" in spec(compose_config())
    assert "niceness: 19" in spec(compose_config("runtime.prefetch_niceness=19"))


def test_an_interrupted_write_leaves_no_temp_file(tmp_path):
    cache = DiskCache(tmp_path)

    def interrupted(file):
        file.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache._write(tmp_path / "images-v1" / "ab" / "abc.npy", interrupted)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_the_run_does_not_wait_for_a_side_process_that_is_slow_to_stop():
    # On a busy machine the low-priority side process may not run for as long as the load lasts.
    import time

    from ad.runtime.prefetch import STOP_WAIT_S, stop

    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        stop(stubborn)
        assert time.perf_counter() - start < STOP_WAIT_S + 1.0
        assert stubborn.poll() is None  # still there: left to exit on its own
    finally:
        stubborn.kill()
        stubborn.wait()
        stubborn.stdout.close()
