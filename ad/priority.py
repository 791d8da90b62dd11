"""CPU priority for helper threads: their work should fill idle cycles, never slow the backbone.

A frozen backbone's pass keeps every core busy with OpenMP threads that wait for each other at
every operator; a helper thread that takes a core even briefly stalls them all. Helpers that can
wait (feature-cache writes, MLflow tracking) therefore run at the lowest priority. Imports nothing
heavy: the start-up prefetch process uses this package without torch.
"""

from __future__ import annotations

import os
import threading

#: The weakest Unix nice value: such a thread runs when a core would otherwise be idle.
LOWEST = 19


def lowest_priority() -> None:
    """Lower the calling thread to the lowest CPU priority (Linux schedules threads by their own id)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST)
    except (AttributeError, OSError):  # not Linux/Unix, or not permitted: the thread competes evenly
        pass
