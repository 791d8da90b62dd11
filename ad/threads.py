"""Thread control for CPU work: one thread for chains of small ops, one per core for GIL-free work."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # imported where used: ad.predict reads images for exported detectors without torch
    import torch

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """One CPU thread (torch, and faiss when loaded) for many small ops or small LAPACK factorisations.

    OpenMP's fork/join costs more than such ops; on shared cores up to 10x more. No-op on GPUs.
    """
    import torch

    faiss = sys.modules.get("faiss")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
        if faiss is not None:
            faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if faiss is not None:
            faiss.omp_set_num_threads(threads)


def map_on_cores(function: Callable[[T], R], items: Sequence[T], workers: int | None = None,
                 name: str = "ad-map") -> list[R]:
    """``[function(item) for item in items]`` on up to ``workers`` threads (default: torch's CPU threads, or
    the usable cores when torch is not loaded).

    For work that releases the GIL (hashing, file reads, Pillow decoding); in order, and the first
    error is raised as the plain loop would raise it.
    """
    torch = sys.modules.get("torch")
    workers = min(workers or (torch.get_num_threads() if torch else len(os.sched_getaffinity(0))), len(items))
    if workers < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        return list(pool.map(function, items))
