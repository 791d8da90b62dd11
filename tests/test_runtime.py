"""The runtime layer: process tuning only the command line applies, and a run() that leaves its process as it was."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import TINY, busy, compose_config

import ad.runtime
from ad.launch import CONF_DIR

SMALL = [*TINY, "dataset.n_train=12", "dataset.n_test_good=6", "dataset.n_test_defect=6", "tracking=none"]
#: One CPU-bound process: spins until its deadline (argv[1], seconds) even if the test never stops it.

#: Runs ``ad.run.run`` in a fresh interpreter and prints what it changed in the process, as JSON.
SIDE_EFFECTS = textwrap.dedent("""
    import contextlib, ctypes, gc, io, json, os, sys
    import torch
    from hydra import compose, initialize_config_dir
    from ad.launch import CONF_DIR
    from ad.run import run
    from ad.runtime import allocator

    def state():
        import random, numpy
        rngs = [random.getstate()[1][:4], numpy.random.get_state()[1][:4].tolist(),
                torch.random.get_rng_state()[:16].tolist()]
        return {"random_states": str(rngs), "gc_frozen": gc.get_freeze_count(),
                "torch_threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "malloc_kept_limit": allocator.kept_limit, "omp_env": os.environ.get("OMP_NUM_THREADS")}

    def mapped_bytes():  # glibc's own large blocks: each its own mapping unless mallopt moved them to the heap
        class MallInfo2(ctypes.Structure):  # glibc 2.33+
            _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        return libc.mallinfo2().hblkhd

    before = state()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=sys.argv[2:])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(cfg, __import__("pathlib").Path(sys.argv[1]))
    after = state()
    mapped = mapped_bytes()
    block = torch.ones(16 * 2**20)  # 64 MB: glibc's default gives it a mapping of its own
    print(json.dumps({"before": before, "after": after, "printed": printed.getvalue(),
                      "mapped_large_block": mapped_bytes() - mapped >= block.nbytes}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and Linux priorities")
def test_run_leaves_the_process_as_it_was(tmp_path):
    overrides = [*SMALL, f"runtime.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run([sys.executable, "-c", SIDE_EFFECTS, str(tmp_path / "run"), *overrides],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["after"] == report["before"]  # gc, torch threads, priority, malloc settings, OMP_NUM_THREADS
    assert report["printed"] == ""
    assert report["mapped_large_block"]  # malloc still maps large blocks as glibc does by default
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_the_runtime_group_is_applied_as_configured(monkeypatch):
    calls = []
    monkeypatch.setattr(ad.runtime, "keep_freed_memory", lambda: calls.append("malloc"))
    monkeypatch.setattr(ad.runtime, "freeze_gc_at_exit", lambda: calls.append("gc"))
    monkeypatch.setattr("ad.runtime.threads.set_threads", lambda count: calls.append(f"threads={count}"))
    with ad.runtime.applied(compose_config("runtime.prefetch=false")):
        assert calls == ["malloc", "gc"]
    calls.clear()
    off = ("runtime.keep_freed_memory=false", "runtime.freeze_gc_at_exit=false", "runtime.prefetch=false")
    with ad.runtime.applied(compose_config(*off, "runtime.threads=3")):
        assert calls == ["threads=3"]


def test_threads_reach_torch_and_a_faiss_loaded_afterwards():
    code = ("from ad.runtime.threads import set_threads; import torch; set_threads(1); import faiss; "
            "print(torch.get_num_threads(), faiss.omp_get_max_threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "1"]


def test_the_garbage_collector_is_frozen_at_exit_once():
    # atexit runs handlers last-in first-out: the reporter, registered first, sees the frozen state
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
            "from ad.runtime import freeze_gc_at_exit\n"
            "freeze_gc_at_exit(); freeze_gc_at_exit()\n"
            "print('before', gc.get_freeze_count())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["before", "0", "frozen", "True"], done.stderr


def test_the_trainer_group_holds_only_what_training_needs():
    cfg = compose_config()
    moved = {"keep_freed_memory", "feature_cache", "prefetch", "cache_dir", "cache_max_gb"}
    assert not moved & set(cfg.trainer) and moved <= set(cfg.runtime)


def launch_metrics(work: Path) -> dict:
    """metrics.json of one ``python -m ad.launch`` of the tiny PaDiM run (no feature cache: computed each time)."""
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "ad.launch", *SMALL, "runtime.feature_cache=false",
                           f"hydra.run.dir={work / 'run'}"], cwd=work, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "run" / "metrics.json").read_text())


def test_the_same_command_gives_the_same_numbers_on_a_busy_machine(tmp_path):
    """trainer.precision=auto is decided from what the CPU is, never from a timing that load could change."""
    assert str(compose_config().trainer.precision) == "auto" and (CONF_DIR / "runtime").is_dir()
    idle = launch_metrics(tmp_path / "idle")
    with busy(600):
        loaded = launch_metrics(tmp_path / "busy")
    numbers = [key for key, value in idle.items() if isinstance(value, float) and not key.endswith("_s")]
    assert {"image_AUROC", "pixel_AUROC"} <= set(numbers)
    assert {key: loaded[key] for key in numbers} == {key: idle[key] for key in numbers}
    assert loaded["precision"] == idle["precision"]
