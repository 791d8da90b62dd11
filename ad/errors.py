"""The one exception type that means "the user's input is wrong": shown as one line, no traceback."""


class ADError(Exception):
    """A problem with the user's data or configuration.

    The message is a single line that names the file or config key at fault and says what to do;
    ``ad.launch`` prints it without a traceback and exits non-zero.
    """
