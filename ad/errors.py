"""The exception types that mean "the user's input is wrong": shown as one line, no traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
