"""Screen federated training schedules at one client per speaker: which one closes the gap to central?

    python benchmarks/fed_schedule.py --work DIR [--seeds 2] [--rounds 20] [--jobs 2] [--only NAME ...]

On the arousal corpus of `benchmarks/parity.py` (same folder layout, so the corpus is shared), every schedule
below trains `configs/arousal.yaml` federated with ``data.shards=0`` for 1 + `--rounds` rounds, in-process
(`simulations.inprocess`: the project's ClientApp and strategy without Ray), and scores every round's global
model on the devel and test speakers. Because the learning rates are constant, the first 1 + 10 rounds of a run
are exactly a 1 + 10 round run, so each schedule is reported at both lengths: the best devel round and the test
UAR of that round, averaged over seeds. Finished runs are kept in ``DIR/schedule/*.json``. Writes
``benchmarks/results/fed_schedule.md`` and a PNG of the devel curves (or ``--out``). Choosing on devel and
reporting test is the honest order; the pooled parity with CIs is `benchmarks/parity.py`'s job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "arousal.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "fed_schedule.md"
SHORT = 10  # phase-2 rounds of the short reading

# name -> overrides of configs/arousal.yaml on top of FEDAVG; none touches `training.*`, so central is unchanged.
FEDAVG = ("federated.local_update=train", "federated.strategy=fedavg", "federated.fraction_train=1.0")
SCHEDULES: dict[str, tuple[str, ...]] = {
    "fedsgd + fedadam 0.01, 8 of 36 (the preset)": ("federated.local_update=gradient", "federated.strategy=fedadam",
                                                    "federated.fraction_train=0.23"),
    "fedavg, 2 local epochs": ("federated.local_epochs=2",),
    "fedavg, 1 local epoch": ("federated.local_epochs=1",),
    "fedavg, 4 local epochs": ("federated.local_epochs=4",),
    "fedavgm 0.5, 2 local epochs": ("federated.local_epochs=2", "federated.strategy=fedavgm",
                                    "federated.server_momentum=0.5"),
    "fedavgm 0.9, 1 local epoch": ("federated.local_epochs=1", "federated.strategy=fedavgm",
                                   "federated.server_momentum=0.9"),
    "fedadam 0.003, 2 local epochs": ("federated.local_epochs=2", "federated.strategy=fedadam",
                                      "federated.server_learning_rate=0.003"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder holding (or receiving) arousal<N>/")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="phase-2 rounds of every run (default 20)")
    parser.add_argument("--speakers", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each (default 2)")
    parser.add_argument("--only", nargs="*", default=list(SCHEDULES), help="schedules to run (default all)")
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(SCHEDULES))
    if unknown:
        parser.error(f"unknown schedule(s) {unknown}; known: {list(SCHEDULES)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from parity import arousal_corpus  # a sibling script: benchmarks/ is sys.path[0]

    work = args.work.resolve()
    manifest_path, manifest = arousal_corpus(work, args.speakers)
    (work / "schedule").mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for name in args.only for seed in range(args.seeds)]
    started = time.time()
    pending = [job for job in jobs if not _result_path(work, args.rounds, *job).is_file()]
    print(f"{len(jobs)} runs, {len(jobs) - len(pending)} already finished", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run, work, manifest_path, args.rounds, name, seed) for name, seed in pending]
        for done, future in enumerate(futures, 1):
            name, seed, seconds = future.result()
            print(f"[{done}/{len(pending)}] {name}, seed {seed}: {seconds:.0f} s", flush=True)
    curves = {job: json.loads(_result_path(work, args.rounds, *job).read_text()) for job in jobs}
    report, figure = render(curves, args, manifest, started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    figure.savefig(args.out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    print(report)
    return 0


def _result_path(work: Path, rounds: int, name: str, seed: int) -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in name)
    return work / "schedule" / f"{slug}-r{rounds}-seed{seed}.json"


def _run(work: Path, manifest_path: Path, rounds: int, name: str, seed: int) -> tuple[str, int, float]:
    """One federated run in a fresh process (its own TensorFlow, one thread); its per-round curve to JSON."""
    sys.path.insert(0, str(ROOT))
    from dsl_fed.io import atomic_write
    from simulations import inprocess

    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower's per-round banner, times 20 rounds

    overrides = [f"data.manifest={manifest_path}", "data.shards=0", f"training.seed={seed}",
                 f"federated.phase2_rounds={rounds}", "federated.fraction_evaluate=0", "federated.client_cpus=1",
                 *FEDAVG, *SCHEDULES[name]]
    result = inprocess.run(CONFIG, overrides, score_rounds=("devel", "test"))
    atomic_write(_result_path(work, rounds, name, seed),
                      json.dumps({"overrides": overrides, "seconds": result.seconds, "rounds": result.per_round}))
    return name, seed, result.seconds


def best_round(curve: list[dict[str, float]], last: int) -> tuple[int, float, float]:
    """(round, devel, test) of the best devel round among rounds 1..`last` (the earliest of ties)."""
    devel = [r["devel"] for r in curve[:last]]
    k = int(np.argmax(devel))
    return k + 1, devel[k], curve[k]["test"]


def render(curves, args, manifest, started: float):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({seed for _, seed in curves})
    classes = len(manifest.classes)
    loads = [x for run in curves.values() for x in run.get("load", [])]
    unrecorded = sum("load" not in run for run in curves.values())
    load = (f"1-min load average {min(loads):.1f}-{max(loads):.1f} at the runs' starts and ends" if loads else "")
    load += f"{'; ' if load else ''}load not recorded for {unrecorded} run(s)" if unrecorded else ""
    minutes = sum(run["seconds"] for run in curves.values()) / 60
    lengths = (SHORT + 1, args.rounds + 1) if args.rounds > SHORT else (args.rounds + 1,)  # rounds read
    lines = [
        "# Federated schedules at one client per speaker",
        "",
        f"`python benchmarks/fed_schedule.py --work DIR --seeds {args.seeds} --rounds {args.rounds}"
        f"{' --only ' + ' '.join(repr(n) for n in args.only) if args.only != list(SCHEDULES) else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}: {len(curves)} runs, {minutes:.0f} min of "
        f"training in all ({load}; times are not comparable across loads). Corpus: eSpeak NG arousal, "
        f"{'/'.join(str(len(manifest.speakers(p))) for p in ('train', 'devel', 'test'))} train / devel / test "
        f"speakers, {classes} classes (chance {1 / classes:.3f}); `configs/arousal.yaml` with `data.shards=0` "
        f"({len(manifest.speakers('train'))} clients, one speaker each), seeds {', '.join(map(str, seeds))}. "
        f"Each cell: mean over seeds of the best devel round's devel UAR, and the test UAR of that same round "
        f"(rounds counted after the phase-1 round). Selection is on devel; test is what it buys.",
        "",
        "| schedule | " + " | ".join(f"1 + {n - 1} rounds: devel / test | best round" for n in lengths)
        + f" | per seed devel (1 + {args.rounds}) |",
        "|---|" + "---|---|" * len(lengths) + "---|",
    ]
    figure, ax = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(name for name, _ in curves):
        runs = [curves[(name, seed)]["rounds"] for seed in seeds]
        cells = []
        for last in lengths:
            picks = [best_round(run, last) for run in runs]
            cells += [f"{np.mean([p[1] for p in picks]):.3f} / {np.mean([p[2] for p in picks]):.3f}",
                      ", ".join(str(p[0] - 1) for p in picks)]
        per_seed = " ; ".join(f"{best_round(run, args.rounds + 1)[1]:.3f}" for run in runs)
        lines.append(f"| {name} | {' | '.join(cells)} | {per_seed} |")
        mean_curve = np.mean([[r["devel"] for r in run] for run in runs], axis=0)
        ax.plot(range(len(mean_curve)), mean_curve, marker=".", label=name)
    ax.axhline(1 / classes, color="grey", linestyle=":", label="chance")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("phase-2 round (0 = after the phase-1 round)")
    ax.set_ylabel(f"devel UAR, mean of {len(seeds)} seeds")
    ax.set_title("One client per speaker: devel UAR by round")
    ax.legend(fontsize=8)
    return "\n".join(lines) + "\n", figure


if __name__ == "__main__":
    sys.exit(main())
