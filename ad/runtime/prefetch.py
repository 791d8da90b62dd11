"""Decode a run's images into the disk cache in a side process while the main process starts up.

A run spends its first seconds importing torch, timm and MLflow, which keeps one core busy and
leaves the other idle. Decoding and resizing the dataset's images on that idle core means fit and
test then read them from the cache instead of decoding them between backbone passes. The side
process only ever adds cache entries (written atomically, as every entry is); it never reports
errors, since the run itself meets the same bad file and says so. It runs at lowered priority, so
once the backbone needs both cores it steps aside, and the run decodes whatever is still missing
itself. The run never waits for it: at its end a side process still going is told to stop and left
to exit on its own, since on a busy machine its low priority may keep it from running at all for
as long as the load lasts.

This module is imported by the command line before torch is: keep its top level light.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

from omegaconf import DictConfig, OmegaConf

from ad.runtime.priority import lower_this_process

#: The side process's default niceness (``runtime.prefetch_niceness``): it gets the core nobody else
#: wants, never the backbone's.
NICENESS = 10
#: How long the run gives a stopped side process to exit before leaving it to exit on its own.
STOP_WAIT_S = 0.5


def wanted(cfg: DictConfig) -> bool:
    """Prefetch only with the cache on (it is where decoded images go) and ``runtime.prefetch`` set."""
    runtime = cfg.get("runtime") or {}
    return bool(runtime.get("feature_cache", False)) and bool(runtime.get("prefetch", True))


def spec(cfg: DictConfig) -> str | None:
    """The side process's instructions (YAML): the resolved dataset node, where the cache is, its niceness.

    None when the dataset config cannot be resolved: the run will then say what is wrong.
    """
    try:
        dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    except Exception:  # noqa: BLE001 - a broken config is the run's error to report, not ours
        return None
    if "download" in dataset:
        dataset["download"] = False  # downloading is the run's job, with its progress bar and lock
    runtime = cfg.runtime
    return OmegaConf.to_yaml({"dataset": dataset, "cache_dir": runtime.get("cache_dir"),
                              "cache_max_gb": float(runtime.get("cache_max_gb", 20)),
                              "niceness": int(runtime.get("prefetch_niceness", NICENESS))})


@contextlib.contextmanager
def prefetch_images(cfg: DictConfig) -> Iterator[subprocess.Popen | None]:
    """Run the side process for the duration of the block (stopped at its end if still going)."""
    instructions = spec(cfg) if wanted(cfg) else None
    process = None
    if instructions is not None:
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "ad.runtime.prefetch"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,  # Ctrl-C goes to the run, not here
                text=True,
            )
            process.stdin.write(instructions)
            process.stdin.close()
        except OSError:  # could not start it, or it died at once: the run decodes everything itself
            stop(process)
            process = None
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen | None) -> None:
    """Ask the side process to stop if it is still running (it removes its temp file on SIGTERM).

    Waits a moment at most: a busy machine may not schedule a low-priority process for as long as
    the load lasts, and the run needs nothing more from it. A daemon thread reaps it once it exits.
    """
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        threading.Thread(target=process.wait, name="ad-prefetch-reaper", daemon=True).start()


def warm(instructions: str) -> int:
    """Decode every train and test image of the dataset into the cache; return how many were decoded."""
    from hydra.utils import instantiate

    from ad.cache import DiskCache
    from ad.data.base import warm as warm_sample
    from ad.errors import ADError

    settings = OmegaConf.create(instructions)
    dataset = instantiate(settings.dataset)
    cache = DiskCache(settings.cache_dir, max_gb=settings.cache_max_gb)
    decoded = 0
    for sample in [*dataset.train, *getattr(dataset, "val", ()), *dataset.test]:  # the order the run reads them in
        if cache.writes_off:  # a full or read-only cache folder: decoding more would store nothing
            break
        try:
            decoded += warm_sample(sample, dataset.image_size, cache)
        except ADError:  # a bad file: the run will name it
            continue
    return decoded


def main() -> None:
    """Entry point of the side process: instructions on stdin, nothing on stdout, exit 0 regardless."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped prefetch removes its temp file
    with contextlib.suppress(Exception):
        instructions = sys.stdin.read()
        # its own session's scheduling group too: it leads that session
        lower_this_process(int(OmegaConf.create(instructions).get("niceness", NICENESS)))
        warm(instructions)


if __name__ == "__main__":
    main()
