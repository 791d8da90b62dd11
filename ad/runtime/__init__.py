"""Process-level tuning of a command-line run, in one place, applied only by ``ad.launch``.

Library code (``ad.run.run`` and everything below it) changes nothing process-wide, so a test or a
notebook can call it and find its process as it was. The command line owns its process and tunes
it from the ``runtime`` config group: glibc's malloc (:mod:`ad.runtime.allocator`), the CPU thread
count of torch and faiss (:mod:`ad.runtime.threads`), the start-up image prefetch in a side process
at lowered priority (:mod:`ad.runtime.prefetch`, :mod:`ad.runtime.priority`) and a frozen garbage
collector at exit. The feature cache's folder and size are in the same group, read by the run.

The command line imports this package before torch: its top level imports nothing heavy.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from collections.abc import Iterator

from omegaconf import DictConfig

from ad.runtime.allocator import keep_freed_memory


def freeze_gc_at_exit() -> None:
    """Freeze every object just before the interpreter shuts down, so its last collection skips them.

    The objects torch, timm and MLflow made are then released with the process instead of being
    traversed one by one; atexit handlers registered before this one still run.
    """
    atexit.unregister(gc.freeze)  # once, however many jobs this process runs
    atexit.register(gc.freeze)


@contextlib.contextmanager
def applied(cfg: DictConfig) -> Iterator[None]:
    """Tune this process for the run of ``cfg`` (``cfg.runtime``) and prefetch its images during the block."""
    settings = cfg.get("runtime") or {}
    # one progress bar per run: MLflow's own, for copying each logged model's files, would print beside it
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if settings.get("keep_freed_memory", True):
        keep_freed_memory()
    if settings.get("threads") is not None:
        from ad.runtime.threads import set_threads

        set_threads(int(settings.threads))
    if settings.get("freeze_gc_at_exit", True):
        freeze_gc_at_exit()
    from ad.runtime.prefetch import prefetch_images  # also the side process's main module: not imported before

    with prefetch_images(cfg):  # images decode on the idle core while the run imports torch on the other
        yield
