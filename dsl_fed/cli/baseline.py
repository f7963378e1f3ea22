"""`dsl_fed baseline CONFIG [section.key=value ...] [--fuse-dev]`: the paper's DeepSpectrum + SVM reference.

See `dsl_fed.baseline.run_baseline`: embeddings of the configured backbone on the same chunks, a linear SVM
with C chosen on devel, clip-level UAR with 95 % CI on devel and test, written to
``<output.directory>/<output.name>-baseline/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "baseline",
        help="the paper's DeepSpectrum + SVM baseline (CNN embeddings, linear SVM, C chosen on devel)",
        description="Embed every chunk with the configured spectrogram front end and backbone, fit "
        "StandardScaler + LinearSVC on train for each C, keep the C with the best devel clip UAR, and report "
        "devel and test UAR with 95 %% CI. Writes <output.directory>/<output.name>-baseline/.",
    )
    p.add_argument("config", type=Path, help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. model.weights=null")
    p.add_argument("--fuse-dev", action="store_true", help="then refit the selected C on train+devel and report test")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing baseline run of this name (only once the new run has finished)")
    p.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None,
                   help="0 silent, 1 progress bars, 2 lines (default: bars on a terminal, else lines)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsl_fed.baseline import baseline_dir, run_baseline
    from dsl_fed.cli.train import command_line, print_summaries, verbosity
    from dsl_fed.config import load_config

    cfg = load_config(args.config, args.overrides)
    metrics = run_baseline(cfg, fuse_dev=args.fuse_dev, verbose=verbosity(args.verbose), command=command_line(),
                           overwrite=args.overwrite)
    print(f"selected C = {metrics['training']['best_c']:g}")
    print_summaries(metrics)
    print(f"run folder: {baseline_dir(cfg)} (report.md, metrics.json, c_search.csv, svm.joblib, plots/)")
    return 0
