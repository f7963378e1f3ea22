"""One exception type for every user-facing problem.

The CLI prints its message as a single line and exits non-zero; library callers can catch it.
Messages name the file, row or config key and say what is wrong.
"""


class DslFedError(Exception):
    """A problem with the user's input (file, manifest row, config key), not a bug."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): third-party errors can span pages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
