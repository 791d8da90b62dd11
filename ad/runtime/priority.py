"""CPU priority of the run's helpers: lowered only for work the run never waits on.

A busy machine must slow a run by its fair share of the cores, never stall it. Work at lowered
priority runs on the cycles ordinary load leaves over, which on a busy machine may be none for as
long as the load lasts, and an unprivileged process can never raise a lowered priority again. So
the threads the run waits for (MLflow tracking, feature-cache writes) run at the run's own
priority, and only the start-up image prefetch, a side process the run never waits for, is
lowered. Imports nothing heavy: the prefetch process uses this module without torch.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def lower_this_process(niceness: int) -> None:
    """Lower the calling process by ``niceness`` (a no-op where that is not possible), for work nobody waits on.

    Where the kernel groups each session for scheduling (autogroup), a nice value only ranks a process
    against its own session: a process that leads a session of its own lowers that group too, or it
    would compete with the run as a whole session, whatever its nice value.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.nice(niceness)
    with contextlib.suppress(AttributeError, OSError, ValueError):
        if os.getsid(0) == os.getpid():  # never the user's own session
            group = Path("/proc/self/autogroup")
            nice = int(group.read_text().split("nice")[-1])  # "/autogroup-42 nice 0"
            group.write_text(str(min(19, nice + niceness)))
