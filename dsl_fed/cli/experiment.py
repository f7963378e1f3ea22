"""`dsl_fed experiment CONFIG [--grid KEY=V1,V2 ...] [--seeds N] [--mode central|federated|both] [k=v ...]`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dsl_fed.cli.arguments import int_in
from dsl_fed.experiment.runner import MAX_CELLS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="the paper's Table 3 on your corpus: a grid x seeds, central and federated, as Ray tasks",
        description="Train every cell of a grid (default: augment.cutmix x augment.specaugment, the paper's four "
        "settings) x seeds, centrally (best devel epoch) and/or federated (best devel round), each cell a Ray task "
        "with experiment.cpus_per_cell CPUs. Writes runs/<name>/experiment/{results.csv,table.md,table.png}; "
        "rerunning skips finished cells.",
    )
    p.add_argument("config", type=Path, help="YAML config (output.name names the experiment)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides for every cell")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis (repeatable); default: augment.cutmix=false,true and augment.specaugment=false,true")
    p.add_argument("--seeds", type=int_in(1, MAX_CELLS), default=1,
                   help=f"seeds per setting: training.seed, +1, ... (default 1; at most {MAX_CELLS} cells in all)")
    p.add_argument("--mode", choices=["central", "federated", "both"], default="both")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="run the cells on this existing Ray cluster (default: a private local Ray)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsl_fed.experiment import parse_grid, run_experiment

    modes = ("central", "federated") if args.mode == "both" else (args.mode,)
    command = shlex.join(["dsl_fed", "experiment", *sys.argv[2:]]) if sys.argv[1:2] == ["experiment"] else ""
    run_experiment(args.config, args.overrides, parse_grid(args.grid), args.seeds, modes, args.ray_address,
                   command=command, echo=lambda line: print(line, flush=True))
    return 0
