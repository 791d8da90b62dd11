"""The malloc setting that keeps freed tensor memory for reuse instead of page-faulting it in again."""

import ctypes
import sys

import pytest
import torch

from ad.runtime import allocator
from ad.runtime.allocator import keep_freed_memory

BLOCK = 64 * 2**20  # larger than glibc's largest adaptive mmap threshold (32 MB)


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): where malloc's memory is."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> MallInfo2:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc 2.33+ (mallinfo2)")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_large_tensor_comes_from_the_heap_and_stays_there_when_freed():
    assert keep_freed_memory()
    assert allocator.kept_limit == allocator.HEAP_BLOCK_LIMIT  # what the process's malloc now does
    before = mallinfo()
    tensor = torch.ones(BLOCK // 4)
    during = mallinfo()
    assert during.hblkhd - before.hblkhd < BLOCK  # not a mapping of its own, unmapped at free (glibc's default)
    assert during.uordblks - before.uordblks >= BLOCK  # the heap holds it (grown, or reusing free space)
    del tensor
    after = mallinfo()
    assert after.arena >= during.arena  # not trimmed: the next batch reuses these pages, no page faults
    assert after.fordblks >= BLOCK  # and they are free for it
