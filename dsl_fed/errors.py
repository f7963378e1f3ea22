"""One exception type for every user-facing problem.

The CLI prints its message as a single line and exits non-zero; library callers can catch it.
Messages name the file, row or config key and say what is wrong.
"""


class DslFedError(Exception):
    """A problem with the user's input (file, manifest row, config key), not a bug."""
