"""The `dsl_fed` command: one sub-command per module in this package.

Each module defines ``register(subparsers)``, which adds its parser(s) with ``set_defaults(func=...)``;
``func(args)`` returns an exit code. Every user-facing problem is printed as one line and exits 2: a
`DslFedError`, and also what the operating system reports at the edge (an unwritable or full output path, a
closed pipe) or undecodable text. SIGTERM (``kill``, ``timeout``, CI cancellation) is handled like Ctrl-C, so
cleanup (stopping child processes, releasing run locks) runs in both cases.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from dsl_fed.errors import DslFedError
from dsl_fed.held_signals import held_signals, hold_signals_during_native_imports
from dsl_fed.quiet import VERBOSE_ENV, quiet_libraries

# Sub-command modules, in the order `dsl_fed --help` lists them.
COMMAND_MODULES: list[str] = ["data", "device", "personalize", "train", "baseline", "federated", "availability", "experiment", "deploy", "plot", "cache"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program happens to be, so the same cleanup as for Ctrl-C runs."""


_SIGTERM_SEEN: list[bool] = []  # Ray turns any KeyboardInterrupt raised inside its waits into a plain one


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other user error (sub-commands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dsl_fed",
        description="Federated DeepSpectrumLite: audio -> spectrogram images -> CNN, trained across speakers.",
    )
    parser.add_argument("--verbose", dest="library_logs", action="store_true",
                        help=f"show the libraries' own start-up logs (TensorFlow, absl); also {VERBOSE_ENV}=1")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dsl_fed.cli.{name}").register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, accepting ``section.key=value`` overrides anywhere on the line (also after options), and
    ``--verbose`` after the command too where the command has no ``--verbose`` of its own."""
    args, extra = parser.parse_known_args(argv)
    if "--verbose" in extra:
        args.library_logs = True
        extra = [a for a in extra if a != "--verbose"]
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    _SIGTERM_SEEN.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (a library caller): leave signals alone
        previous = None
    try:
        return _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    command = "dsl_fed"
    try:
        hold_signals_during_native_imports()
        with held_signals():  # the sub-command modules import most of what start-up takes
            parser = build_parser()
        args = parse_args(parser, argv)
        command = f"dsl_fed {args.command}"
        if args.library_logs:
            os.environ[VERBOSE_ENV] = "1"  # also for the processes this command starts
        quiet_libraries()
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at interpreter exit
        return code
    except DslFedError as exc:
        return _fail(command, str(exc))
    except BrokenPipeError:
        # The reader went away (`dsl_fed predict ... | head`): silence the final flush of stdout too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _fail(command, "output pipe closed by the reader")
    except FileExistsError as exc:  # what creating an output folder says when a file has its name
        return _fail(command, f"{exc.filename}: is a file, not a folder")
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(command, f"{where}{exc.strerror or exc}")
    except UnicodeError as exc:
        return _fail(command, f"text that is not valid UTF-8 ({exc})")
    except MemoryError:
        return _fail(command, "out of memory; use smaller data.chunk_seconds, training.batch_size or images")
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated) or bool(_SIGTERM_SEEN)
        _print_error(f"{command}: {'terminated' if terminated else 'interrupted'}")
        _forget_unhandled_interrupt()
        return 143 if terminated else 130


def _fail(command: str, message: str) -> int:
    _print_error(f"{command}: error: {message}")
    return 2


def _print_error(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # stderr itself is gone; the exit code still tells
        pass


def _forget_unhandled_interrupt() -> None:
    """Keep the exit code of a handled Ctrl-C at 130.

    CPython marks a KeyboardInterrupt as unhandled when it leaves code run through ``PyRun_String`` (pybind11
    runs such code while SciPy or TensorFlow import) and then ends the process by SIGINT after exit, even though
    the interrupt was handled here. Every ``PyRun_String`` call clears that mark first, so an empty one does.
    """
    import ctypes

    ctypes.pythonapi.PyRun_SimpleString(b"")


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough; cleanup must not be interrupted again
    _SIGTERM_SEEN.append(True)
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
