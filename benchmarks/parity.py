"""Federated vs central parity at natural partitions, with speaker-level confidence intervals.

    python benchmarks/parity.py --work DIR [--seeds 3] [--speakers 60] [--group 3]

On the paralinguistic arousal corpus (`dsl_fed make-speech-data --task arousal`), runs ``dsl_fed experiment
configs/arousal.yaml`` for seeds 0..S-1 in three cells per seed: central (best devel epoch), federated with one
client per training speaker (``data.shards=0``, best devel round) and federated with `--group` speakers per client.
Every selected model is scored again on the devel and test clips, and the seeds are pooled: the mean UAR over
seeds, and a two-stage bootstrap (speakers, then their clips; the same draws for every seed and mode, so the gap is
paired) gives the 95 % CI of each mean and of the gap federated - central. Parity: the pooled gap is at most 2
points below zero, on devel and on test. Resumable (finished cells are kept). Writes
``benchmarks/results/parity.md`` and ``parity.png`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

from dsl_fed.metrics import uar

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "arousal.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "parity.md"
TOLERANCE = 0.02
BOOT = 2000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the corpus and the experiment runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    parser.add_argument("--speakers", type=int, default=60, help="speakers of the corpus (default 60)")
    parser.add_argument("--group", type=int, default=3, help="speakers per client in the grouped setting (default 3)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from dsl_fed.config import load_config
    from dsl_fed.experiment import run_experiment

    work = args.work.resolve()
    manifest_path, manifest = arousal_corpus(work, args.speakers)
    train_speakers = len(manifest.speakers("train"))
    grouped = max(1, train_speakers // args.group)
    settings = ((("data.shards", "0"),), (("data.shards", str(grouped)),))
    overrides = [f"data.manifest={manifest_path}", f"output.directory={work / 'runs'}", "output.name=parity"]
    started = time.time()
    out = run_experiment(CONFIG, overrides, seeds=args.seeds, settings=settings, command="benchmarks/parity.py")
    cells = read_cells(out / "results.csv")
    cfg = load_config(CONFIG, overrides)
    scores = {key: score_run(run_dir, cfg, manifest) for key, run_dir in cells.items()}
    report, figure = render(scores, manifest, train_speakers, grouped, args, started, schedule(cfg.federated))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    figure.savefig(args.out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    print(report)
    return 0


def arousal_corpus(work: Path, speakers: int):
    """``(manifest path, manifest)`` of the arousal corpus of `speakers` speakers in `work`, made on first use
    (`fed_schedule.py` shares it)."""
    from dsl_fed.data import read_manifest
    from dsl_fed.data.arousal import make_arousal_corpus

    path = work / f"arousal{speakers}" / "manifest.csv"
    if not path.is_file():
        make_arousal_corpus(path.parent, speakers=speakers, progress=False)
    return path, read_manifest(path)


def read_cells(results: Path) -> dict[tuple[str, str, int], Path]:
    """``(mode, shards, seed) -> run folder`` from an experiment's ``results.csv`` (central cells: shards '-')."""
    with results.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cells = {}
    for row in rows:
        shards = row["setting"].split("shards=")[-1] if row["mode"] == "federated" else "-"
        cells[row["mode"], shards, int(row["seed"])] = Path(row["run_dir"])
    return cells


def score_run(run_dir: Path, cfg, manifest) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``partition -> (labels, predictions, speakers)`` per clip of the run's selected model."""
    from dsl_fed.data import load_chunks
    from dsl_fed.federated.checkpoint import RunDirectory
    from dsl_fed.models import load_model
    from dsl_fed.predict import predict_clips

    path = run_dir / "model.keras"
    if not path.is_file():  # federated: the best round
        run = RunDirectory(run_dir)
        path = run_dir / f"round_{run.best_round()}" / "model.keras"
    model = load_model(path)
    out = {}
    for part in ("devel", "test"):
        chunks = load_chunks(manifest.partition(part), cfg.data, manifest.classes, progress=False)
        _, probs, labels, speakers = predict_clips(model, chunks, batch_size=64)
        out[part] = (labels, probs.argmax(axis=1), speakers)
    return out


def pooled_bootstrap(runs: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]], n: int = BOOT,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Per mode, the seed-mean UAR of `n` two-stage resamples (speakers, then clips), drawn once for all.

    Every run of every mode scores the same clips in the same order, so one draw of clip indices resamples them
    all alike: the gap between modes is paired, and the seeds' spread is inside every resample.
    """
    labels, _, speakers = next(iter(runs.values()))[0]
    names = np.unique(speakers)
    members = [np.flatnonzero(speakers == s) for s in names]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        picked = rng.integers(0, len(names), len(names))
        draws.append(np.concatenate([m[rng.integers(0, len(m), len(m))] for m in (members[i] for i in picked)]))
    return {mode: np.array([np.mean([uar(labels[d], pred[d]) for _, pred, _ in seeds]) for d in draws])
            for mode, seeds in runs.items()}


def schedule(fed) -> str:
    """The federated recipe of the config, in words, for the report's header."""
    update = ("one gradient step per sampled client" if fed.local_update == "gradient"
              else f"{fed.local_epochs} local epoch{'s' if fed.local_epochs != 1 else ''} per sampled client")
    server = fed.strategy + (f" (eta {fed.server_learning_rate:g}, beta_2 {fed.server_beta_2:g}, tau {fed.server_tau:g})"
                             if fed.strategy in ("fedadam", "fedyogi") else "")
    return (f"federated {fed.phase1_rounds} + {fed.phase2_rounds} rounds, {server}, {update}, "
            f"fraction_train {fed.fraction_train:g}")


def render(scores, manifest, train_speakers: int, grouped: int, args, started: float, recipe: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({seed for _, _, seed in scores})
    classes = len(manifest.classes)
    setups = [("0", f"{train_speakers} clients, 1 speaker each"),
              (str(grouped), f"{grouped} clients of about {train_speakers / grouped:.1f} speakers")]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# Federated vs central parity at natural partitions", "",
        f"`python benchmarks/parity.py --work DIR --seeds {args.seeds} --speakers {args.speakers} --group {args.group}` "
        f"on {time.strftime('%Y-%m-%d %H:%M')} ({time.time() - started:.0f} s, finished cells reused; load average "
        f"{load}). Corpus: eSpeak NG arousal, {len(manifest.speakers('train'))} / {len(manifest.speakers('devel'))} / "
        f"{len(manifest.speakers('test'))} train / devel / test speakers, {len(manifest.clips)} clips, {classes} classes "
        f"(chance {1 / classes:.3f}). Config `configs/arousal.yaml` ({recipe}); seeds {', '.join(map(str, seeds))}. "
        "Central at its "
        "best devel epoch, federated at its best devel round; both re-scored here on every devel and test clip. "
        f"UAR = mean over seeds; 95 % CI and the gap's CI from a two-stage bootstrap ({BOOT} resamples of speakers, "
        "then their clips, the same resamples for every seed and mode). Parity: pooled gap >= "
        f"-{100 * TOLERANCE:.0f} points.", "",
        "| setting | partition | central UAR [95 % CI] | federated UAR [95 % CI] | gap [95 % CI] | per seed c / f | parity |",
        "|---|---|---|---|---|---|---|",
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for p, part in enumerate(("devel", "test")):
        for s, (shards, label) in enumerate(setups):
            central = [scores["central", "-", k][part] for k in seeds]
            federated = [scores["federated", shards, k][part] for k in seeds]
            boot = pooled_bootstrap({"central": central, "federated": federated})
            point = {m: np.mean([uar(t, y) for t, y, _ in runs]) for m, runs in (("central", central), ("federated", federated))}
            gap = point["federated"] - point["central"]
            ci = {m: np.quantile(v, [0.025, 0.975]) for m, v in boot.items()}
            gap_ci = np.quantile(boot["federated"] - boot["central"], [0.025, 0.975])
            each = " ; ".join(f"{uar(c[0], c[1]):.3f} / {uar(f[0], f[1]):.3f}" for c, f in zip(central, federated))
            lines.append(
                f"| {label} | {part} | {point['central']:.3f} [{ci['central'][0]:.3f}, {ci['central'][1]:.3f}] | "
                f"{point['federated']:.3f} [{ci['federated'][0]:.3f}, {ci['federated'][1]:.3f}] | {100 * gap:+.1f} points "
                f"[{100 * gap_ci[0]:+.1f}, {100 * gap_ci[1]:+.1f}] | {each} | {'yes' if gap >= -TOLERANCE else 'no'} |")
            for m, (mode, colour) in enumerate((("central", "tab:blue"), ("federated", "tab:orange"))):
                x = s * 3 + m
                axes[p].errorbar(x, point[mode], yerr=[[point[mode] - ci[mode][0]], [ci[mode][1] - point[mode]]],
                                 fmt="o", color=colour, capsize=4, label=mode if s == 0 else None)
        axes[p].axhline(1 / classes, color="grey", ls=":", label="chance")
        axes[p].set_xticks([0.5, 3.5], [label.split(",")[0] for _, label in setups])
        axes[p].set_title(f"{part} UAR (mean of {len(seeds)} seeds, 95 % CI)")
    axes[0].legend(loc="lower left")
    return "\n".join(lines) + "\n", fig


if __name__ == "__main__":
    sys.exit(main())
