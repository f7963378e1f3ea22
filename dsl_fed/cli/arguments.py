"""Bounded numbers for command-line options: every number a user can type has a range.

A number outside it is one line naming the option (argparse's ``argument --threads: must be in [1, 8], got
100000``), never a crash in a library that was handed it (LiteRT segfaults on 100 000 threads).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from dsl_fed.config import MAX_SEED


def max_threads() -> int:
    """Most threads worth asking for: four per CPU this process may use."""
    return 4 * len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4 * (os.cpu_count() or 1)


def int_in(low: int, high: int | Callable[[], int]) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [low, high] (`high` may be computed when the option is parsed)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        top = high() if callable(high) else high
        if not low <= value <= top:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {top}], got {value}")
        return value

    return parse


def seed(text: str) -> int:
    return int_in(0, MAX_SEED)(text)


def threads(text: str) -> int:
    return int_in(1, max_threads)(text)


def snr_range(text: str) -> tuple[float, float]:
    """``LOW,HIGH`` dB with 0 <= LOW <= HIGH <= 200."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in dB, e.g. 24,40, got {text!r}") from None
    if not 0 <= low <= high <= 200:
        raise argparse.ArgumentTypeError(f"must satisfy 0 <= LOW <= HIGH <= 200 dB, got {text!r}")
    return low, high
