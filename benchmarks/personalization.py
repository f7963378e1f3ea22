"""Personalisation on the device: how much fine-tuning the head on K of a speaker's clips (LiteRT) helps that speaker.

Run:  python benchmarks/personalization.py [--work DIR] [--ks 3,6] [--epochs N]
Writes benchmarks/results/personalization.md and prints it.

Per corpus - the demo corpus (``dsl_fed make-demo-data``'s defaults, configs/quickstart.yaml) and the
paralinguistic arousal corpus (``dsl_fed make-speech-data DIR --task arousal``, configs/arousal.yaml) - a model is
trained centrally as ``dsl_fed train --central`` does (`dsl_fed.central.run_central`) and exported trainable
(`dsl_fed.trainable_export.export_trainable`). Then, exactly as ``dsl_fed evaluate MODEL --personalize K`` does
(`dsl_fed.personal_eval`), for every devel and every test speaker and each K: fine-tune the head on K of the
speaker's clips (stratified by class, the config's seed) with LiteRT and score the speaker's other clips, before
(the central model's head) and after. Reported per corpus, partition and K: speakers, classes, chance, epochs,
the mean per-speaker UAR before / after / change with two-stage speaker-bootstrap 95 % CIs, the worst 10 % of
speakers before and after, the pooled UAR of the scored clips, and seconds of LiteRT fine-tuning per speaker.
Every figure in the file comes from the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CORPORA = {  # name -> (config, description)
    "demo": (REPO / "configs" / "quickstart.yaml", "demo (synthetic intonation: falling / flat / rising)"),
    "arousal": (REPO / "configs" / "arousal.yaml", "arousal (eSpeak NG speech, 3 arousal levels)"),
}
PARTITIONS = ("devel", "test")


def main() -> int:
    from dsl_fed.personalize import DEFAULT_EPOCHS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep corpora and runs here (default: temporary)")
    parser.add_argument("--corpora", default=",".join(CORPORA), help="comma-separated, from: " + ", ".join(CORPORA))
    parser.add_argument("--ks", default="3,6", help="clips per speaker to fine-tune on (default: 3,6)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"fine-tuning epochs (default: {DEFAULT_EPOCHS}, dsl_fed personalize's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "personalization.md")
    args = parser.parse_args()
    corpora = [c for c in args.corpora.split(",") if c]
    unknown = sorted(set(corpora) - set(CORPORA))
    if unknown:
        parser.error(f"unknown corpus {', '.join(unknown)}; known: {', '.join(CORPORA)}")
    ks = [int(k) for k in args.ks.split(",") if k]
    from dsl_fed.io import atomic_write

    load_start, started = os.getloadavg()[0], time.time()
    with tempfile.TemporaryDirectory(prefix="dsl_fed_personalization_") as tmp:
        work = (args.work or Path(tmp)).resolve()
        runs = [measure_corpus(name, work, ks, args.epochs) for name in corpora]
    run = {"command": " ".join(["python benchmarks/personalization.py", *sys.argv[1:]]),
           "minutes": (time.time() - started) / 60, "load_start": load_start, "load_end": os.getloadavg()[0]}
    report = render(runs, run)
    target = atomic_write(args.out, report)
    print(report)
    print(f"written to {target}", file=sys.stderr)
    return 0


def log(text: str) -> None:
    print(f"[personalization] {text}", file=sys.stderr, flush=True)


def corpus(name: str, work: Path) -> Path:
    """The corpus' manifest in `work`, made on first use with the CLI's defaults."""
    path = work / name / "manifest.csv"
    if path.is_file():
        return path
    log(f"{name}: making the corpus")
    if name == "demo":
        from dsl_fed.data.demo import make_demo_corpus

        return make_demo_corpus(path.parent, progress=False)
    from dsl_fed.data.arousal import make_arousal_corpus

    return make_arousal_corpus(path.parent, progress=False)


def measure_corpus(name: str, work: Path, ks: list[int], epochs: int) -> dict:
    """Central model, trainable export, then every (partition, K): the `dsl_fed.personal_eval` summary."""
    from dsl_fed.central import run_central
    from dsl_fed.config import load_config
    from dsl_fed.data.manifest import load_manifest
    from dsl_fed.data.pipeline import load_chunks
    from dsl_fed.models import load_model
    from dsl_fed.personal_eval import personalize_speakers, summarize
    from dsl_fed.trainable_export import export_trainable

    manifest_path = corpus(name, work)
    config, description = CORPORA[name]
    cfg = load_config(config, [f"data.manifest={manifest_path}", f"output.directory={work / 'runs'}",
                               f"output.name={name}"])
    manifest = load_manifest(cfg.data)
    run_dir = cfg.output.run_dir
    if not (run_dir / "model.keras").is_file():
        log(f"{name}: training centrally ({cfg.training.phase1_epochs} + {cfg.training.phase2_epochs} epochs)")
        run_central(cfg, verbose=0, command=f"dsl_fed train --central {config.relative_to(REPO)}")
    trainable = run_dir / "tflite_trainable" / "model.tflite"
    if not trainable.is_file():
        export_trainable(load_model(run_dir / "model.keras"), trainable, classes=manifest.classes, cfg=cfg)
    rows = []
    for partition in PARTITIONS:
        clips = manifest.partition(partition, required=True)
        chunks = load_chunks(clips, cfg.data, manifest.classes, progress=False)
        for k in ks:
            log(f"{name}: {partition}, K = {k}")
            began = time.perf_counter()
            results, skipped = personalize_speakers(
                trainable, clips, chunks, k=k, epochs=epochs, batch_size=cfg.training.batch_size,
                seed=cfg.training.seed, class_balance=cfg.training.class_balance, threads=1)
            seconds = time.perf_counter() - began
            summary = summarize(results, manifest.classes, seed=cfg.training.seed)
            rows.append({"partition": partition, "k": k, "epochs": epochs, "skipped": skipped, "summary": summary,
                         "seconds_per_speaker": seconds / max(1, len(results)), "clips": len(clips)})
    return {"name": name, "description": description, "config": str(config.relative_to(REPO)),
            "classes": list(manifest.classes), "speakers": {p: len(manifest.speakers(p)) for p in ("train", *PARTITIONS)},
            "batch_size": cfg.training.batch_size, "seed": cfg.training.seed, "class_balance": cfg.training.class_balance,
            "central_epochs": (cfg.training.phase1_epochs, cfg.training.phase2_epochs), "rows": rows}


def render(runs: list[dict], run: dict) -> str:
    """The results file: what was run, one table row per (corpus, partition, K)."""
    from dsl_fed.bootstrap import ci_label

    lines = [
        "# Personalisation on the device: per-speaker UAR before and after fine-tuning the head on K clips",
        "",
        f"Command: `{run['command']}` · {run['minutes']:.1f} min on {os.cpu_count()} CPU(s) · 1-min load average "
        f"{run['load_start']:.2f} at start, {run['load_end']:.2f} at end.",
        "",
    ]
    for r in runs:
        p1, p2 = r["central_epochs"]
        lines.append(f"- **{r['name']}**: {r['description']}; `{r['config']}`; speakers train / devel / test "
                     f"{r['speakers']['train']} / {r['speakers']['devel']} / {r['speakers']['test']}. Central model: "
                     f"`dsl_fed train --central` ({p1} + {p2} epochs, the config's model selection on devel), "
                     f"exported with `--trainable`; fine-tuning with batch {r['batch_size']}, class balance "
                     f"{r['class_balance']}, seed {r['seed']}.")
    first = runs[0]["rows"][0]["summary"]["pooled"]["before"]
    lines += [
        "",
        "Per speaker of the partition, as `dsl_fed evaluate MODEL --personalize K` does: K of the speaker's clips "
        "(stratified by class) fine-tune the head with LiteRT (a fresh optimizer, the model's head to start), the "
        "speaker's other clips are scored before (the central model) and after. Mean: over speakers, with a 95 % "
        "two-stage bootstrap interval (speakers, then their scored clips; the change paired). Worst 10 %: mean UAR "
        "of the ceil(10 %) lowest speakers, chosen separately before and after. Pooled: UAR of all scored clips, "
        f"{ci_label(first)}. s / speaker: LiteRT fine-tuning and scoring, 1 thread.",
        "",
        "| corpus | partition | speakers | classes | chance | K | epochs | mean UAR before [95 % CI] | "
        "after [95 % CI] | change [95 % CI] | worst 10 % before → after | pooled UAR before → after | s / speaker |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|---|---|---:|",
    ]
    for r in runs:
        classes = len(r["classes"])
        for row in r["rows"]:
            s = row["summary"]
            mean, ci, worst, pooled = s["mean"], s["mean_ci"], s["worst"], s["pooled"]
            skipped = f" ({len(row['skipped'])} left out)" if row["skipped"] else ""
            lines.append(
                f"| {r['name']} | {row['partition']} | {s['speakers']}{skipped} | {classes} | {1 / classes:.3f} | "
                f"{row['k']} | {row['epochs']} | {mean['before']:.3f} [{ci['before'][0]:.3f}, {ci['before'][1]:.3f}] | "
                f"{mean['after']:.3f} [{ci['after'][0]:.3f}, {ci['after'][1]:.3f}] | "
                f"{mean['gain']:+.3f} [{ci['gain'][0]:+.3f}, {ci['gain'][1]:+.3f}] | "
                f"{worst['before']['worst_10pct']:.3f} → {worst['after']['worst_10pct']:.3f} "
                f"({s['worst_count']} speaker(s)) | "
                f"{pooled['before']['uar']:.3f} [{pooled['before']['ci'][0]:.3f}, {pooled['before']['ci'][1]:.3f}] → "
                f"{pooled['after']['uar']:.3f} [{pooled['after']['ci'][0]:.3f}, {pooled['after']['ci'][1]:.3f}] | "
                f"{row['seconds_per_speaker']:.2f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
