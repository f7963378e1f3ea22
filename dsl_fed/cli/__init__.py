"""The `dsl_fed` command: one sub-command per module in this package.

Each module defines ``register(subparsers)``, which adds its parser(s) with ``set_defaults(func=...)``;
``func(args)`` returns an exit code. Every user-facing problem is a `DslFedError`, printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dsl_fed.errors import DslFedError

# Before any sub-command imports TensorFlow: keep its C++ start-up chatter off the user's terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Sub-command modules, in the order `dsl_fed --help` lists them.
COMMAND_MODULES: list[str] = ["data", "device", "train", "federated", "plot"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsl_fed",
        description="Federated DeepSpectrumLite: audio -> spectrogram images -> CNN, trained across speakers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dsl_fed.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DslFedError as exc:
        print(f"dsl_fed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsl_fed {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
