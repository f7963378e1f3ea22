"""Privacy/utility curve: final devel UAR vs epsilon for a few noise multipliers (or epsilon targets).

    python benchmarks/privacy.py [--rounds 5] [--noise 0.01,0.03,0.1,0.3,1 | --epsilons 1,4,8] [--clip-norm 1.0]
                                 [--config C] [--data DIR] [--out FILE.md] [section.key=value ...]

By default the quickstart recipe (3 clients of 2 speakers of the 10-speaker demo corpus); at scale e.g.
``--config configs/arousal.yaml --data DIR --epsilons 1,4,8 data.shards=0 federated.fraction_train=0.05`` on a
speaker-rich corpus (``dsl_fed make-speech-data DIR --task arousal --speakers 3334 --clips 1``: 2,000 one-speaker
clients, 100 per round). ``--epsilons`` sizes each run's noise multiplier for that epsilon after ``--rounds``
releases (`dsl_fed.privacy.noise_for_epsilon`). Every run uses
``federated.dp.mode=client``, trained in-process (`simulations.inprocess`: the project's ClientApp with its
clipping mod and the project's strategy with Flower's DP wrapper), plus the same run without DP. Epsilon is the
RDP accountant's after the last round at ``federated.dp.delta`` (`dsl_fed.privacy`). Writes
``benchmarks/results/privacy.md`` and ``privacy.png``; the header's counts are counted from the corpus and the
config (`simulations.run_setting`), the verdict lines computed from the measured numbers.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # simulations/ is a folder of the repo, not an installed package

from simulations.inprocess import run  # noqa: E402
from simulations.run_setting import RunSetting, run_setting  # noqa: E402

from dsl_fed.privacy import noise_for_epsilon  # noqa: E402

CONFIG = REPO / "configs" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="1 phase-1 round + the rest in phase 2")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--noise", default="0.01,0.03,0.1,0.3,1", help="noise multipliers")
    group.add_argument("--epsilons", default=None, help="epsilon targets: each run's noise gives that epsilon")
    parser.add_argument("--config", type=Path, default=CONFIG, help="YAML config (default: configs/quickstart.yaml)")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one process each)")
    parser.add_argument("--data", type=Path, default=REPO / "demo_data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "privacy.md")
    parser.add_argument("overrides", nargs="*", help="further section.key=value settings")
    args = parser.parse_args(argv)
    manifest = args.data / "manifest.csv"
    if not manifest.is_file():
        from dsl_fed.data.demo import make_demo_corpus

        make_demo_corpus(args.data, progress=False)
    base = [f"data.manifest={manifest}", "federated.phase1_rounds=1", f"federated.phase2_rounds={args.rounds - 1}",
            "federated.fraction_evaluate=0", "output.name=privacy", *args.overrides]
    setting = run_setting(args.config, base)
    if args.epsilons:
        args.noise = ",".join(f"{noise_for_epsilon(float(e), args.rounds, setting.delta):.4g}" for e in args.epsilons.split(","))
    noise = [None, *(float(v) for v in args.noise.split(","))]  # None: the run without DP
    # A fresh process per run (a reused one keeps TensorFlow's state and slows down run by run); `--jobs` at a time.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=spawn, max_tasks_per_child=1) as pool:
        outcomes = dict(zip(noise, pool.map(run_one, noise, [base] * len(noise), [args.clip_norm] * len(noise),
                                            [args.config] * len(noise))))
    for z, (eps, uar, seconds) in outcomes.items():
        print(f"noise {z}: epsilon {eps}, devel UAR {uar:.3f} ({seconds:.0f} s)", flush=True)
    write_results(args, setting, outcomes[None][1], [(z, *outcomes[z][:2]) for z in noise[1:]])
    return 0


def run_one(z: float | None, base: list[str], clip_norm: float, config: Path = CONFIG) -> tuple[float | None, float, float]:
    """(epsilon, final devel UAR, seconds) of one run; z None: without DP."""
    dp = [] if z is None else ["federated.dp.mode=client", f"federated.dp.noise_multiplier={z}",
                               f"federated.dp.clip_norm={clip_norm}"]
    outcome = run(config, [*base, *dp])
    return outcome.epsilon, outcome.devel_uar, outcome.seconds


def header(args: argparse.Namespace, setting: RunSetting) -> str:
    """The command and what it ran on; every number comes from `args` or from `setting`."""
    privacy = f"--epsilons {args.epsilons}" if args.epsilons else f"--noise {args.noise}"
    config = args.config.resolve()
    config = config.relative_to(REPO) if config.is_relative_to(REPO) else config
    command = " ".join(["python benchmarks/privacy.py", f"--rounds {args.rounds}", privacy,
                        f"--clip-norm {args.clip_norm:g}", *([f"--config {config}"] if args.config != CONFIG else []),
                        *args.overrides])
    return (
        f"`{command}`: config `{config}`, {setting.corpus_speakers}-speaker corpus "
        f"`{args.data.name}`, {setting.clients_text()} ({setting.sampling_text()}), client-side {setting.clipping} "
        f"clipping at {args.clip_norm:g}, {args.rounds} rounds; epsilon at delta {setting.delta:g} (RDP accountant), "
        f"final devel UAR ({setting.devel_text()})."
    )


def write_results(args: argparse.Namespace, setting: RunSetting, baseline: float,
                  rows: list[tuple[float, float, float]]) -> None:
    from dsl_fed.io import atomic_write
    from dsl_fed.report import save_figure

    lines = [
        "# Privacy/utility: devel UAR vs epsilon",
        "",
        f"{header(args, setting)} Machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}.",
        "",
        "| noise multiplier | epsilon | devel UAR |",
        "|---:|---:|---:|",
        f"| no DP | — | {baseline:.3f} |",
        *(f"| {z:g} | {eps:.3g} | {uar:.3f} |" for z, eps, uar in rows),
        "",
    ]
    useful = [(eps, z) for z, eps, uar in rows if uar >= baseline - 0.05]
    lines.append(
        f"Within 5 points of the run without DP: noise multiplier {max(useful)[1]:g} at epsilon {max(useful)[0]:.3g} and "
        "weaker privacy." if useful else
        "No noise multiplier here keeps devel UAR within 5 points of the run without DP."
    )
    lines += ["", f"![devel UAR vs epsilon]({args.out.with_suffix('.png').name})", ""]
    atomic_write(args.out, "\n".join(lines))
    save_figure(_figure(setting, baseline, rows), args.out.with_suffix(".png"))
    print("\n".join(lines))


def _figure(setting: RunSetting, baseline: float, rows: list[tuple[float, float, float]]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([eps for _, eps, _ in rows], [uar for _, _, uar in rows], "o-", label="client-level DP")
    for z, eps, uar in rows:
        ax.annotate(f"z={z:g}", (eps, uar), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(baseline, color="tab:green", linestyle="--", linewidth=1, label="no DP")
    ax.axhline(setting.chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta {setting.delta:g})")
    ax.set_ylabel("final devel UAR")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
