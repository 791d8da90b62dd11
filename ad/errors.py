"""The exception types that mean "the user's input is wrong": shown as one line, no traceback."""

from __future__ import annotations

import difflib
import errno
import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

#: What a write fails with on a full disk, or a full quota.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class ADError(Exception):
    """A problem with the user's data or configuration.

    The message is a single line that names the file or config key at fault and says what to do;
    ``ad.launch`` prints it without a traceback and exits non-zero.
    """


class ConfigError(ADError):
    """Input rejected before the run started (config, dataset listing, checkpoint): nothing ran or was tracked.

    ``ad.launch`` exits 2 for it, as for a wrong override, and 1 for an ADError met once the run started.
    """


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in its traceback."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(exc):
        return lines[-1].split("ADError: ", 1)[-1].split("ConfigError: ", 1)[-1]
    return " ".join(lines)


def did_you_mean(value: object, options: Iterable[object]) -> str:
    """``did you mean 'x'? `` for the closest of ``options`` to a mistyped ``value``, else an empty string."""
    close = difflib.get_close_matches(str(value), [str(option) for option in options], n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def write_error(exc: OSError, path: Path) -> ADError:
    """One line for a failed write of ``path``: ``no space left on <folder>`` for a full disk, else the OS's reason."""
    path = Path(path)
    if exc.errno in NO_SPACE:
        return ADError(f"no space left on {path.parent} (writing {path.name}); free some space there, "
                       "or run in a folder on another disk (hydra.run.dir=...)")
    return ADError(f"cannot write {path} ({exc.strerror or exc}); make {path.parent} writable, "
                   "or run in another folder (hydra.run.dir=...)")


def out_of_space(exc: BaseException, store: str | Path | None = None) -> str | None:
    """Where a full disk stopped a write, from anywhere in an exception's chain; None when no disk was full.

    A run turns it into one line instead of the traceback of whichever library was writing (torch,
    MLflow's SQLite store, an artifact copy); ``store`` names the folder of a SQLite store that is full.
    """
    chain = list(causes(exc))
    for current in chain:
        if isinstance(current, OSError) and current.errno in NO_SPACE:
            name = current.filename2 or current.filename  # a copy's or a rename's destination
            if not isinstance(name, (str, bytes)) or not name:
                return "the disk it wrote to"
            path = Path(os.fsdecode(name))
            return str(path if path.is_dir() else path.parent)
    if any("database or disk is full" in str(current) for current in chain):  # SQLite's SQLITE_FULL
        return str(store) if store else "the tracking store's disk"
    return None


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or during (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's ``main``: an ADError becomes ``error: <line>`` on stderr and its exit status, Ctrl-C exit 130.

    The status is the error's ``exit_status`` attribute when it has one (a command's own refusals), else 2
    (bad input); the commands stage their outputs, so an interrupted one has written nothing.
    """

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ADError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return int(getattr(exc, "exit_status", 2))
        except KeyboardInterrupt:
            print("interrupted; nothing written", file=sys.stderr)
            return 130

    return wrapped
