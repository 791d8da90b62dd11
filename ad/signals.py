"""Stop signals handled like Ctrl-C: SIGTERM (``kill``, ``timeout``, ``docker stop``, SLURM's time
limit) and the preemption signal of submitit's SLURM jobs (``$SUBMITIT_PREEMPT_SIGNAL``, USR2 by
default).

Inside :func:`stop_signals` such a signal raises :class:`Stopped`, a ``KeyboardInterrupt``, so the
run ends its MLflow run as KILLED as it does for Ctrl-C; a trained method's loop defers it to the
end of the step and saves a checkpoint first (``ad.trainer.deferred_interrupt``). The command then
exits 128 + the signal's number (143 for SIGTERM). A handler that was installed before (submitit's,
which requeues the job) is called after that clean-up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


def stop_signal_numbers() -> tuple[int, ...]:
    """SIGTERM and the preemption signal submitit sends before a SLURM job's time is up."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    preempt = getattr(signal, name, None)
    return tuple(dict.fromkeys(s for s in (signal.SIGTERM, preempt) if s is not None))


class Stopped(KeyboardInterrupt):
    """A stop signal, handled like Ctrl-C; the command exits with :attr:`exit_code`."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + self.signum


def interruption(signum: int | None) -> KeyboardInterrupt:
    """The exception that stops a run for ``signum``: KeyboardInterrupt for Ctrl-C, Stopped for the others."""
    return Stopped(signum) if signum not in (None, signal.SIGINT) else KeyboardInterrupt()


def raise_stopped(signum: int, frame) -> None:
    """Signal handler: raise Stopped where the main thread is."""
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, stop signals raise :class:`Stopped`; afterwards the earlier handlers are back.

    When the block ends by such a signal, the handler installed before it (submitit's, which
    checkpoints the job's launcher state and requeues it) runs after the block's own clean-up.
    Off the main thread signals cannot be caught: a no-op there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, raise_stopped) for signum in stop_signal_numbers()}
    try:
        yield
    except Stopped as stopped:
        restore(previous)
        chained = previous.get(stopped.signum)
        if callable(chained) and chained is not raise_stopped:
            chained(stopped.signum, None)
        raise
    finally:
        restore(previous)


def restore(handlers: dict[int, object]) -> None:
    """Put back the given signal handlers."""
    for signum, handler in handlers.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
