"""How many CPU threads torch and faiss use in this process (``runtime.threads``), set by the command line only.

Both libraries keep one process-wide count, so a library function that set it would change every
later computation of its caller; the command line owns its process and may. faiss, loaded later by
the methods that search with it, reads the count from ``OMP_NUM_THREADS`` when it starts, so the
count is also put there (before faiss loads) rather than importing faiss for every run.
"""

from __future__ import annotations

import os
import sys


def set_threads(count: int) -> None:
    """Use ``count`` CPU threads for torch's and faiss's parallel loops (intra-op), from now on."""
    import torch

    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)  # libraries that start OpenMP later, faiss among them
    if (faiss := sys.modules.get("faiss")) is not None:
        faiss.omp_set_num_threads(count)
