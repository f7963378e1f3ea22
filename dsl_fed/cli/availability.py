"""`dsl_fed make-availability OUT.csv --clients N --rounds R`: a synthetic diurnal availability trace.

Each client gets a random time zone and is online for one contiguous stretch of every simulated day; the file is
what ``federated.availability`` reads (`dsl_fed.availability`). An existing file is never replaced.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dsl_fed.cli.arguments import int_in, seed
from dsl_fed.config import MAX_COUNT


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-availability",
        help="write a synthetic diurnal availability trace (federated.availability)",
        description="Write the CSV federated.availability reads (client,online_from,online_to; 1-based rounds, "
        "inclusive): each client gets a random phase (a time zone) and is online for a contiguous share of "
        "every simulated day. Client ids are 0..N-1, a simulation's partition ids. Deterministic by seed.",
    )
    p.add_argument("out", metavar="OUT.csv", type=Path, help="the trace to write (must not exist)")
    p.add_argument("--clients", type=int_in(1, MAX_COUNT), required=True, metavar="N", help="clients (ids 0..N-1)")
    p.add_argument("--rounds", type=int_in(1, MAX_COUNT), required=True, metavar="R", help="rounds the trace covers")
    p.add_argument("--rounds-per-day", type=int_in(1, MAX_COUNT), default=24, metavar="D",
                   help="rounds in one simulated day (default 24: a round an hour)")
    p.add_argument("--online", type=share, default=0.3, metavar="SHARE",
                   help="share of each day a client is online, in (0, 1] (default 0.3), rounded to whole rounds")
    p.add_argument("--seed", type=seed, default=0, metavar="S", help="random seed of the phases (default 0)")
    p.set_defaults(func=run)


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    from dsl_fed.availability import diurnal_trace, write_trace

    trace = diurnal_trace(args.clients, args.rounds, args.rounds_per_day, args.online, args.seed)
    path = write_trace(trace, args.out)
    window = max(1, round(args.online * args.rounds_per_day))
    print(f"wrote {path}: {args.clients} clients over {args.rounds} rounds, each online {window} of every "
          f"{args.rounds_per_day} rounds ({trace.share(args.clients, args.rounds):.1%} of client-rounds)")
    return 0
