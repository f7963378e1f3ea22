"""Federated robustness as FedAudio measures it: devel UAR (best round) under noise, label flips, client dropout
and skewed shard sizes, each varied on its own against the unperturbed run.

    python -m simulations.robustness configs/quickstart.yaml [section.key=value ...] \\
        [--snr 20,10,0] [--flip 0.2,0.4] [--dropout 0.34,0.67] [--skew 0.8] [--seeds 1] [--ray-address ADDR]

The cells are `dsl_fed experiment` cells (federated mode, one Ray task each, resumable) over the
``robustness.*`` keys, which perturb the clients' in-memory copies and the server's client choice
(`dsl_fed.robustness`), never the files. Writes ``runs/<name>/robustness/``: ``robustness.{md,png}`` next to
the cells' ``results.csv`` / ``table.md`` (not ``experiment/``, so a Table-3 run of the same name keeps its table).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

EMPTY = "''"  # how the recorded command shows an axis given empty (that axis is skipped)
AXES = {  # command-line option -> (config key, label, unit)
    "snr": ("robustness.noise_snr_db", "additive white noise", "SNR dB"),
    "flip": ("robustness.label_flip", "flipped training labels", "share of clips"),
    "dropout": ("robustness.client_dropout", "client dropout per round", "share of clients"),
    "skew": ("robustness.shard_skew", "skewed shard sizes", "share removed from all but one client"),
}


def main(argv: list[str] | None = None) -> int:
    from dsl_fed.errors import DslFedError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    parser.add_argument("--snr", default="20,10,0", help="noise SNRs in dB (comma-separated; empty = skip)")
    parser.add_argument("--flip", default="0.2,0.4", help="label-flip shares")
    parser.add_argument("--dropout", default="0.34", help="client dropout shares")
    parser.add_argument("--skew", default="0.8", help="shard-size skews")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--ray-address", default=None)
    args = parser.parse_args(argv)
    levels = {axis: [v.strip() for v in getattr(args, axis).split(",") if v.strip()] for axis in AXES}
    try:
        out = run(args.config, args.overrides, levels, args.seeds, args.ray_address)
    except DslFedError as exc:
        print(f"robustness: error: {exc}", file=sys.stderr)
        return 2
    print((out / "robustness.md").read_text())
    return 0


def run(config: Path, overrides: list[str], levels: dict[str, list[str]], seeds: int = 1,
        ray_address: str | None = None) -> Path:
    """Run the base cell and one cell per (axis, level) x seed; write the robustness table and plot."""
    from dsl_fed.experiment import run_experiment

    settings = [()] + [((AXES[axis][0], level),) for axis, values in levels.items() for level in values]
    command = " ".join(["python -m simulations.robustness", str(config), *overrides,
                        *(f"--{axis} {','.join(values) or EMPTY}" for axis, values in levels.items()),
                        f"--seeds {seeds}"])
    out = run_experiment(config, overrides, seeds=seeds, modes=("federated",), ray_address=ray_address,
                         settings=settings, command=command, folder="robustness")
    with (out / "results.csv").open(newline="") as f:
        write(out, list(csv.DictReader(f)), levels, command)
    return out


def write(out: Path, rows: list[dict[str, str]], levels: dict[str, list[str]], command: str = "") -> None:
    """``robustness.md`` (devel / test UAR mean over seeds per axis and level) and ``robustness.png``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dsl_fed.io import atomic_write
    from dsl_fed.report import save_figure

    def scores(key: str | None, level: str | None) -> tuple[float, float, float, int]:
        picked = [r for r in rows if (key is None and all(not r.get(k) for k, _, _ in AXES.values()))
                  or (key is not None and r.get(key) == level)]
        if not picked:
            return (float("nan"),) * 3 + (0,)
        devel = [float(r["devel_uar"]) for r in picked]
        test = [float(r["test_uar"]) for r in picked if r["test_uar"]]
        worst = [float(r["devel_worst_speaker_uar"]) for r in picked]
        return float(np.mean(devel)), float(np.mean(test)) if test else float("nan"), float(np.mean(worst)), len(picked)

    base = scores(None, None)
    lines = ["# Federated robustness", "", *([f"`{command}`", ""] if command else []),
             "Devel UAR at the best devel round, test UAR of that round, worst devel speaker; mean over seeds. Each "
             f"perturbation is applied alone. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
             f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}.", "",
             "| perturbation | level | devel UAR | change vs base | test UAR | worst speaker | seeds |",
             "|---|---|---:|---:|---:|---:|---:|",
             f"| none (base) | - | {base[0]:.3f} | - | {base[1]:.3f} | {base[2]:.3f} | {base[3]} |"]
    active = [axis for axis in AXES if levels.get(axis)]
    fig = Figure(figsize=(3.2 * max(1, len(active)), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(active)), sharey=True))
    for ax, axis in zip(axes, active):
        key, label, unit = AXES[axis]
        xs, ys = [], []
        for level in levels[axis]:
            devel, test, worst, n = scores(key, level)
            lines.append(f"| {label} | {level} | {devel:.3f} | {100 * (devel - base[0]):+.1f} points | {test:.3f} | "
                         f"{worst:.3f} | {n} |")
            xs.append(float(level))
            ys.append(devel)
        clean_x = (max(xs) + 10 if axis == "snr" else 0.0) if xs else 0.0  # no noise = highest SNR
        ax.plot([clean_x, *xs], [base[0], *ys], marker="o")
        if axis == "snr":
            ax.set_xticks([*xs, clean_x], [*levels[axis], "none"])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("devel UAR (best round)")
    fig.tight_layout()
    save_figure(fig, out / "robustness.png")
    atomic_write(out / "robustness.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
