"""Library start-up chatter stays off the terminal, so a user error is one line and a run's output is ours.

TensorFlow 2.21 writes "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
and an oneDNN notice to the stderr file descriptor while it loads, before any log level applies (also with
``TF_CPP_MIN_LOG_LEVEL`` set). So while ``tensorflow`` is first imported, file descriptor 2 goes to a temporary
file, and afterwards every line but that chatter is written back (an import error still shows). After loading,
``TF_CPP_MIN_LOG_LEVEL=3`` and absl's verbosity keep TensorFlow's C++ and Python logs quiet.

``dsl_fed --verbose`` (or the environment variable ``DSL_FED_VERBOSE=1``) leaves everything as the libraries
print it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from dsl_fed.import_hook import wrap_first_import

VERBOSE_ENV = "DSL_FED_VERBOSE"
# Native log lines written before absl's logging is initialised: its notice, then INFO/WARNING lines such as
# "I0000 00:00:1796424882.820301    9389 port.cc:153] oneDNN custom operations are on. ..."
CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called|[IW]\d{4} \S+\s+\d+ \S+:\d+\] )")


def verbose() -> bool:
    """True when the user asked for the libraries' own logs."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet_libraries() -> None:
    """From now on, the first ``import tensorflow`` of this process drops its start-up chatter (idempotent)."""
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        wrap_first_import({"tensorflow"}, _quiet_import)


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """TensorFlow's first import: its load-time chatter dropped, then absl's Python logger set to errors."""
    with without_chatter():
        yield
    _quiet_absl()


@contextlib.contextmanager
def without_stderr_lines(pattern: re.Pattern) -> Iterator[None]:
    """Hold what is written to file descriptor 2 (native code included) and pass on every line `pattern` does not
    find."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to protect
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not pattern.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def without_chatter() -> contextlib.AbstractContextManager:
    """`without_stderr_lines` for TensorFlow's load-time `CHATTER`."""
    return without_stderr_lines(CHATTER)


def _quiet_absl() -> None:
    """absl's Python logger (used by TensorFlow and Keras) prints warnings to stderr: errors only."""
    with contextlib.suppress(Exception):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
