"""Keep freed tensor memory inside the process, so every batch does not page-fault its buffers in again.

glibc's malloc hands each large block (from 128 kB up to 32 MB, adaptively) to the kernel with its
own ``mmap`` and gives it back on ``free``; the next batch's activations of the same size then
fault in and zero every 4 kB page again. PyTorch has no caching allocator on the CPU to avoid this,
so we tell malloc to serve such blocks from its heap and not to trim the heap: freed memory is
reused by the next batch. The cost is that the process keeps its peak memory until it exits, which
is why only the command line, which owns its process, asks for it (``runtime.keep_freed_memory``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap; larger ones (rare) still get their own mapping.
HEAP_BLOCK_LIMIT = 1 << 30

#: The block limit this process's malloc was given, or None while it runs with glibc's defaults.
kept_limit: int | None = None


def keep_freed_memory(limit: int = HEAP_BLOCK_LIMIT) -> bool:
    """Make glibc keep freed blocks up to ``limit`` bytes for reuse; False where there is no glibc."""
    global kept_limit
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, limit) == 1 and mallopt(M_TRIM_THRESHOLD, limit) == 1
    if applied:
        kept_limit = limit
    log.debug("malloc keeps freed blocks up to %d bytes: %s", limit, applied)
    return applied
