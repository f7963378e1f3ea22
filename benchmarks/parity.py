"""Federated vs central parity on two corpora: the quickstart schedule and, optionally, candidate schedules.

    python benchmarks/parity.py --work /tmp/parity [--candidate "federated.strategy=fedavg"] [--candidates-on speech]

For the demo corpus (`dsl_fed make-demo-data`, intonation) and the eSpeak NG speech corpus
(`dsl_fed make-speech-data`, spoken commands), runs ``dsl_fed experiment configs/quickstart.yaml --grid
augment.cutmix=false --seeds 3 --mode both`` with the quickstart schedule and with each candidate's overrides,
and reports the mean devel UAR of central (best devel epoch) and federated (best devel round) over seeds 0-2,
the gap, and whether it is within 2 points. About 1 h per schedule on 2 busy cores; resumable (finished cells
are kept; schedules that change only ``federated.*`` keys share the central cells). Writes
``benchmarks/results/parity.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "parity.md"
TOLERANCE = 0.02


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the corpora and the experiment runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--candidate", action="append", default=[], metavar="OVERRIDES",
                        help="a schedule to compare, as space-separated section.key=value overrides (repeatable)")
    parser.add_argument("--candidates-on", choices=("both", "demo", "speech"), default="both",
                        help="run the candidates on one corpus only (each federated cell takes ~10 min)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from dsl_fed.data.demo import make_demo_corpus
    from dsl_fed.data.speech import make_speech_corpus
    from dsl_fed.experiment import run_experiment

    work = args.work.resolve()
    corpora = {"demo (intonation, 3 classes)": work / "demo_data" / "manifest.csv",
               "speech (eSpeak NG commands, 5 classes)": work / "speech" / "manifest.csv"}
    if not corpora["demo (intonation, 3 classes)"].is_file():
        make_demo_corpus(work / "demo_data", progress=False)
    if not corpora["speech (eSpeak NG commands, 5 classes)"].is_file():
        make_speech_corpus(work / "speech", progress=False)
    started = time.time()
    rows = []
    for corpus, manifest in corpora.items():
        short = corpus.split()[0]  # demo | speech
        candidates = args.candidate if args.candidates_on in ("both", short) else []
        for k, extra in enumerate([[], *[c.split() for c in candidates]]):
            variant = "quickstart" if k == 0 else f"candidate {k}"
            # One experiment folder per corpus: cells are named by the settings that shape them, so schedules
            # that differ only in federated.* keys share their central cells, and reruns reuse every finished cell.
            name = f"parity-{short}"
            overrides = [f"data.manifest={manifest}", f"output.directory={work / 'parity'}", f"output.name={name}",
                         *extra]
            out = run_experiment(CONFIG, overrides, grid=(("augment.cutmix", ("false",)),), seeds=3)
            rows.append((corpus, variant, extra, out, summarise(out / "results.csv")))
    command = " ".join(["python benchmarks/parity.py --work DIR",
                        *[f'--candidate "{c}"' for c in args.candidate],
                        *([f"--candidates-on {args.candidates_on}"] if args.candidates_on != "both" else [])])
    report = render(rows, started, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


def summarise(results: Path) -> dict:
    """Mean devel/test UAR per mode over the seeds, the selected epochs/rounds and the wall time."""
    with results.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for mode in ("central", "federated"):
        picked = [r for r in rows if r["mode"] == mode]
        out[mode] = {
            "devel": sum(float(r["devel_uar"]) for r in picked) / len(picked),
            "devel_each": [float(r["devel_uar"]) for r in picked],
            "test": sum(float(r["test_uar"]) for r in picked) / len(picked),
            "worst": sum(float(r["devel_worst_speaker_uar"]) for r in picked) / len(picked),
            "selected": [r["selected"] for r in picked],
            "seconds": sum(float(r["seconds"]) for r in picked) / len(picked),
            "mb": sum(float(r["bytes_moved"]) for r in picked) / len(picked) / 1e6,
        }
    return out


def render(rows, started: float, command: str) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# Federated vs central parity", "",
        f"`{command}` on {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load "
        f"average {load} when this report was written (finished cells are reused: their wall times reflect the load "
        "when they ran). Each row is `dsl_fed experiment configs/quickstart.yaml "
        "data.manifest=CORPUS [schedule overrides] --grid augment.cutmix=false --seeds 3 --mode both`; central is "
        "reported at its best devel epoch, federated at its best devel round (test: that same model). Mean over "
        f"seeds 0-2; parity means federated devel UAR within {100 * TOLERANCE:.0f} points of central. An earlier "
        "measurement with its round-by-round curves and screened schedules: [parity_fedavg.md](parity_fedavg.md).", "",
        "| corpus | schedule | central devel (per seed) | federated devel (per seed) | gap | parity | central test "
        "| federated test | worst speaker c / f | federated selected | federated wall | federated MB |",
        "|---|---|---|---|---:|---|---:|---:|---|---|---:|---:|",
    ]
    for corpus, variant, extra, _, s in rows:
        c, f = s["central"], s["federated"]
        gap = f["devel"] - c["devel"]
        schedule = " ".join(extra) if extra else "configs/quickstart.yaml"
        lines.append(
            f"| {corpus} | {variant}: `{schedule}` | {c['devel']:.3f} ({', '.join(f'{v:.3f}' for v in c['devel_each'])}) "
            f"| {f['devel']:.3f} ({', '.join(f'{v:.3f}' for v in f['devel_each'])}) | {100 * gap:+.1f} points | "
            f"{'yes' if gap >= -TOLERANCE else 'no'} | {c['test']:.3f} | {f['test']:.3f} | {c['worst']:.3f} / "
            f"{f['worst']:.3f} | {', '.join(f['selected'])} | {f['seconds']:.0f} s | {f['mb']:.2f} |")
    lines += ["", "## Experiment timing", "", timing(rows), "",
              f"{time.time() - started:.0f} s for this report (finished cells are reused, not rerun)."]
    return "\n".join(lines) + "\n"


def timing(rows) -> str:
    """Cells per hour measured here (tiny preset) and projected for DenseNet121 from benchmarks/training.py."""
    cores = os.cpu_count() or 1
    out = ["Measured wall time per cell (quickstart preset, tiny CNN, under the load above, whatever CPUs the cell "
           "had when it ran), and cells per hour when one cell runs at a time:", "",
           "| corpus | schedule | central s/cell | central cells/h | federated s/cell | federated cells/h |",
           "|---|---|---:|---:|---:|---:|"]
    for corpus, variant, _, _, s in rows:
        c, f = s["central"]["seconds"], s["federated"]["seconds"]
        out.append(f"| {corpus} | {variant} | {c:.0f} | {3600 / c:.1f} | {f:.0f} | {3600 / f:.1f} |")
    steps = _training_step_times()
    if steps:
        p1, p2 = steps
        per_1000 = (40 * p1 + 200 * p2) * -(-1000 // 32)
        out += ["", f"DenseNet121 (224x224, batch 32) trains at {p1:.3f} s/step in phase 1 and {p2:.3f} s/step in "
                f"phase 2 on this machine (`benchmarks/results/training.md`). The paper's 40 + 200 epochs then cost "
                f"{per_1000 / 3600:.1f} h per 1000 training chunks for one central cell on all {cores} cores, i.e. "
                f"{3600 / per_1000:.2f} such cells per hour (a federated cell trains the same epochs per client, "
                "plus the per-round overhead above); the grid's cells only divide the cores between them."]
    return "\n".join(out)


def _training_step_times() -> tuple[float, float] | None:
    """Plain phase-1 and phase-2 step times from benchmarks/results/training.md (None if it is missing)."""
    import re

    path = ROOT / "benchmarks" / "results" / "training.md"
    if not path.is_file():
        return None
    text = path.read_text()
    found = [re.search(rf"^\| phase {k} [^|]*\| none \|[^|]*\| ([0-9.]+) ", text, re.M) for k in (1, 2)]
    return (float(found[0].group(1)), float(found[1].group(1))) if all(found) else None


if __name__ == "__main__":
    sys.exit(main())
