"""Thread helpers: a GIL-free map over the cores, and one-thread sections that restore the count."""

import threading
import time

import pytest
import torch

from ad.threads import map_on_cores, single_threaded


def test_map_keeps_the_order_and_uses_several_threads():
    names = set()

    def slow_square(x):
        names.add(threading.current_thread().name)
        time.sleep(0.01)  # sleeping releases the GIL, as hashing and decoding do
        return x * x

    assert map_on_cores(slow_square, list(range(8)), workers=2, name="ad-test") == [x * x for x in range(8)]
    assert len(names) == 2 and all(name.startswith("ad-test") for name in names)


def test_map_with_one_worker_runs_in_the_calling_thread():
    names = map_on_cores(lambda _: threading.current_thread().name, [1, 2, 3], workers=1)
    assert names == [threading.current_thread().name] * 3


def test_map_raises_the_error_of_the_first_failing_item():
    def fail_on_odd(x):
        if x % 2:
            raise ValueError(f"item {x}")
        return x

    with pytest.raises(ValueError, match="item 1"):
        map_on_cores(fail_on_odd, [0, 1, 2, 3], workers=2)


def test_single_threaded_restores_the_thread_count():
    before = torch.get_num_threads()
    with single_threaded(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
