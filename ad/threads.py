"""Thread-count control for long chains of small CPU ops, shared by the methods that need it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """One CPU thread (torch, and faiss when loaded) for many small ops or small LAPACK factorisations.

    OpenMP's fork/join costs more than such ops; on shared cores up to 10x more. No-op on GPUs.
    """
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
