"""Scale benchmark: seconds per round, peak memory and bytes as the registered and the sampled clients grow.

Run:  python benchmarks/scale.py --corpus DIR/manifest.csv [--work DIR]
      python benchmarks/scale.py --quick            # a 12-speaker corpus, tiny numbers (a test runs it)
Writes benchmarks/results/scale.md and scale.png (``--out``) and prints the table.

The corpus is a speaker-rich arousal corpus (``dsl_fed make-speech-data DIR --task arousal --speakers 3334
--clips 1``: 2,000 training speakers, three clips each). Every run is ``dsl_fed simulate configs/arousal.yaml``
(the tiny preset) on a manifest holding the first N training speakers (``data.shards=0``: one client per
speaker) and the same devel speakers, with ``federated.fraction_train`` giving K clients per round, one phase-1
and one phase-2 round:

- N = 10 / 100 / 1,000 / 2,000 registered clients at K = 10 per round,
- K = 10 / 50 / 100 / 200 per round at N = 2,000,
- K = N = 100 with two phase-1 rounds: round 2 finds every sampled client's embeddings in the run's cache
  (`dsl_fed simulate` keeps the cache per run, so only a round after a client's first one is cached),
- DenseNet121 at 224 px (``model.backbone=densenet121 model.weights=null spectrogram.image_size=224``), 4 clients
  of 10 training speakers each (``data.shards=4``), two phase-1 rounds of the same clients, with and without the
  embedding cache: round 2 compared.

A run's peak RSS is the largest sum of resident set sizes over the whole process tree of ``dsl_fed simulate``
(the CLI, SuperLink, ServerApp, simulation, Ray and its ClientApp actors), sampled every 0.2 s; pages shared
between processes count in each. Seconds per round are the round's wall time in the run's ``history.csv``
(Flower part: messages, local training, replies; plus the server's scoring and publishing). Bytes per round are
the array payload sent and received. Timings are wall-clock on a shared machine: the header records the load
average at start and end.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONFIG = REPO / "configs" / "arousal.yaml"
# local training, as in the kept results (the preset's gradient updates skip the phase-1 embedding cache)
FEDAVG = ["federated.local_update=train", "federated.strategy=fedavg", "federated.local_epochs=2"]
DENSENET = ["model.backbone=densenet121", "model.weights=null", "spectrogram.image_size=224"]
SAMPLE_SECONDS = 0.2


@dataclass(frozen=True)
class Plan:
    """What one benchmark invocation runs."""

    registered: tuple[int, ...]  # registered clients at `fixed_per_round`
    fixed_per_round: int
    per_round: tuple[int, ...]  # sampled clients at max(registered)
    cached_per_round: int  # registered = sampled clients of the run whose second phase-1 round is cached
    devel_speakers: int
    model_clients: int  # DenseNet121 (or, --quick, the tiny model) rows: registered = sampled
    model_speakers: int  # training speakers per client in those rows (data.shards groups them)
    model_devel_speakers: int
    model_overrides: tuple[str, ...]
    model_name: str


FULL = Plan(registered=(10, 100, 1000, 2000), fixed_per_round=10, per_round=(10, 50, 100, 200), cached_per_round=100,
            devel_speakers=60, model_clients=4, model_speakers=10, model_devel_speakers=4, model_overrides=tuple(DENSENET),
            model_name="DenseNet121 224 px")
QUICK = Plan(registered=(3, 6), fixed_per_round=2, per_round=(2,), cached_per_round=2, devel_speakers=2,
             model_clients=2, model_speakers=1, model_devel_speakers=2, model_overrides=(), model_name="tiny (quick)")


@dataclass
class RunResult:
    """One `dsl_fed simulate` run: its clients, rounds (history rows), peak RSS and wall time."""

    label: str
    registered: int
    per_round: int
    rounds: list[dict] = field(default_factory=list)
    peak_rss: int = 0  # bytes, sum over the process tree
    peak_process_rss: int = 0  # bytes, the largest single process
    processes: int = 0  # most processes alive at once in the tree
    wall: float = 0.0

    def round_seconds(self, k: int) -> float:
        row = self.rounds[k - 1]
        return float(row["seconds"]) + float(row["server_seconds"])

    def flower_seconds(self, k: int) -> float:
        return float(self.rounds[k - 1]["seconds"])

    def round_bytes(self, k: int) -> int:
        row = self.rounds[k - 1]
        return int(row["bytes_up"]) + int(row["bytes_down"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="manifest of a speaker-rich arousal corpus (see above)")
    parser.add_argument("--quick", action="store_true", help="a fresh 12-speaker corpus and tiny numbers")
    parser.add_argument("--work", type=Path, default=None, help="folder for manifests and runs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.md")
    args = parser.parse_args()
    if not args.quick and args.corpus is None:
        parser.error("--corpus is required (or --quick)")
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="dsl_fed_scale_") as tmp:
        results, info = measure(plan, args.corpus, args.work or Path(tmp), command=_command(args))
    from dsl_fed.io import atomic_write
    from dsl_fed.report import save_figure

    report = render(plan, results, info)
    atomic_write(args.out, report)
    save_figure(figure(plan, results), args.out.with_suffix(".png"))
    print(report)
    return 0


def _command(args: argparse.Namespace) -> str:
    return "python benchmarks/scale.py" + (" --quick" if args.quick else f" --corpus {args.corpus}")


def measure(plan: Plan, corpus: Path | None, work: Path, command: str) -> tuple[dict[tuple, RunResult], dict]:
    """Every run of `plan` on `corpus` (None: make the quick corpus in `work`): the results by key and what the
    header needs (command, corpus, load averages, minutes)."""
    work.mkdir(parents=True, exist_ok=True)
    load_start, started = os.getloadavg(), time.time()
    if corpus is None:
        from dsl_fed.data.arousal import make_arousal_corpus

        corpus = make_arousal_corpus(work / "corpus", speakers=12, clips=1, progress=False)
    rows = read_rows(corpus)
    top = max(plan.registered)
    train = sorted({r["speaker"] for r in rows if r["partition"] == "train"})
    if len(train) < top:
        raise SystemExit(f"{corpus}: {len(train)} training speakers, the plan needs {top}")
    results: dict[tuple, RunResult] = {}

    def simulate(label: str, registered: int, per_round: int, devel: int, extra: list[str], name: str,
                 speakers: int | None = None) -> RunResult:
        """A run of `registered` clients; `speakers` training speakers among them (default one each)."""
        speakers = speakers or registered
        manifest = sub_manifest(rows, corpus, work / "manifests" / f"n{speakers}_d{devel}.csv", speakers, devel)
        result = simulate_run(label, manifest, registered, per_round, work / "runs", name, extra)
        print(f"{label}: {registered} registered, {per_round} per round: peak RSS {result.peak_rss / 2**20:.0f} MiB, "
              f"rounds {[round(result.round_seconds(k), 1) for k in range(1, len(result.rounds) + 1)]} s",
              file=sys.stderr, flush=True)
        return result

    one_each = ["federated.phase1_rounds=1", "federated.phase2_rounds=1"]
    for n in plan.registered:
        results[("registered", n)] = simulate("registered", n, plan.fixed_per_round, plan.devel_speakers, one_each,
                                              f"n{n}_k{plan.fixed_per_round}")
    for k in plan.per_round:
        key = ("registered", top) if k == plan.fixed_per_round else ("per_round", k)
        if key not in results:
            results[key] = simulate("per round", top, k, plan.devel_speakers, one_each, f"n{top}_k{k}")
    # two phase-1 rounds of the same clients: the second reads every embedding from the run's cache
    k = plan.cached_per_round
    two = ["federated.phase1_rounds=2", "federated.phase2_rounds=0"]
    results[("cached", k)] = simulate("cached", k, k, plan.devel_speakers, two, f"cached_n{k}")
    m, grouped = plan.model_clients, plan.model_speakers > 1
    two = [*two, *plan.model_overrides, *([f"data.shards={m}"] if grouped else [])]
    for cache in (True, False):
        if cache and not plan.model_overrides and not grouped and (m, plan.model_devel_speakers) == (k, plan.devel_speakers):
            results[("model", cache)] = results[("cached", k)]  # the same run (the cache is on by default): reuse it
            continue
        results[("model", cache)] = simulate(
            "model", m, m, plan.model_devel_speakers, [*two, f"training.embedding_cache={str(cache).lower()}"],
            f"model_cache_{cache}", speakers=m * plan.model_speakers)
    run_info = {"command": command, "corpus": corpus, "rows": rows, "train_speakers": len(train),
                "load_start": load_start, "load_end": os.getloadavg(), "minutes": (time.time() - started) / 60}
    return results, run_info


# --------------------------------------------------------------------------------------------- corpus


def read_rows(manifest: Path) -> list[dict[str, str]]:
    """The manifest's rows with absolute file names."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        path = Path(row["filename"])
        row["filename"] = str(path if path.is_absolute() else (manifest.parent / path).resolve())
    return rows


def sub_manifest(rows: list[dict[str, str]], corpus: Path, out: Path, train_speakers: int, devel_speakers: int) -> Path:
    """A manifest of the first `train_speakers` training and `devel_speakers` devel speakers (sorted), no test."""
    if out.is_file():
        return out
    keep = {part: set(sorted({r["speaker"] for r in rows if r["partition"] == part})[:count])
            for part, count in (("train", train_speakers), ("devel", devel_speakers))}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label", "speaker", "partition"])
        for r in rows:
            if r["speaker"] in keep.get(r["partition"], ()):
                writer.writerow([r["filename"], r["label"], r["speaker"], r["partition"]])
    return out


# ---------------------------------------------------------------------------------------------- a run


def simulate_run(label: str, manifest: Path, registered: int, per_round: int, runs: Path, name: str,
                 extra: list[str]) -> RunResult:
    """`dsl_fed simulate` in a child process, its process tree's RSS sampled until it ends."""
    fraction = min(1.0, (per_round + 0.5) / registered)  # Flower samples int(N * fraction) clients
    overrides = [f"data.manifest={manifest}", f"output.directory={runs}", f"output.name={name}", "data.shards=0",
                 f"federated.fraction_train={fraction:.6g}", f"federated.min_train_nodes={min(2, per_round)}",
                 "federated.min_available_nodes=2", *FEDAVG, *extra]
    command = [sys.executable, "-m", "dsl_fed", "simulate", str(CONFIG), *overrides, "--overwrite"]
    log = runs / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result = RunResult(label, registered, per_round)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            sizes = tree_rss(root)
            result.peak_rss = max(result.peak_rss, sum(sizes))
            result.peak_process_rss = max([result.peak_process_rss, *sizes])
            result.processes = max(result.processes, len(sizes))
            time.sleep(SAMPLE_SECONDS)
    result.wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"dsl_fed simulate failed ({label}, {registered}/{per_round}): {' | '.join(tail)}; log {log}")
    from dsl_fed.federated.checkpoint import RunDirectory

    result.rounds = RunDirectory(runs / name).read_history()
    return result


def tree_rss(root: psutil.Process) -> list[int]:
    """RSS in bytes of `root` and every live descendant (processes that end while being read are skipped)."""
    sizes = []
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return sizes
    for p in procs:
        try:
            sizes.append(p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sizes


# -------------------------------------------------------------------------------------------- report


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def kb(n: int) -> str:
    return f"{n / 1e3:,.1f} kB"


def render(plan: Plan, results: dict[tuple, RunResult], info: dict) -> str:
    """The results file: header, the two sweeps, the cache rows and the verdicts, all from `results`."""
    from dsl_fed.stats import cpu_name

    rows = info["rows"]
    classes = sorted({r["label"] for r in rows})
    top = max(plan.registered)
    per_speaker = sum(r["partition"] == "train" for r in rows) / max(1, info["train_speakers"])
    start, end = info["load_start"], info["load_end"]
    lines = [
        "# Scale: registered vs sampled clients",
        "",
        f"`{info['command']}` on {time.strftime('%Y-%m-%d %H:%M %Z')}, {info['minutes']:.1f} min; {cpu_name()}, "
        f"{os.cpu_count()} CPUs; load average (1/5/15 min) {_load(start)} at start, {_load(end)} at end (shared "
        "machine: wall-clock timings).",
        f"Corpus `{info['corpus']}`: {len(rows):,} clips, {info['train_speakers']:,} training speakers with "
        f"{per_speaker:.1f} clips each, classes {', '.join(classes)} ({len(classes)}). Each run uses the first N "
        f"training speakers (one client each, `data.shards=0`) and the same {plan.devel_speakers} devel speakers "
        f"(scored on the server); config `configs/arousal.yaml` (tiny preset), 1 phase-1 + 1 phase-2 round.",
        "",
        "Peak RSS: the largest sum of resident memory over the whole process tree of `dsl_fed simulate` (CLI, "
        "SuperLink, ServerApp, simulation, Ray, ClientApp actors; shared pages count in each process), sampled every "
        f"{SAMPLE_SECONDS} s. Round s: the round's wall time from `history.csv` (messages, local training, replies, "
        "server scoring and publishing); round 1 includes starting the client actors. Bytes: array payload sent + "
        "received in the round.",
        "",
        "| registered | sampled / round | phase-1 round s | phase-2 round s | peak RSS (tree) | largest process | "
        "processes | bytes phase 1 | bytes phase 2 | run wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sweep = [results[("registered", n)] for n in plan.registered]
    sweep += [results[("per_round", k)] for k in plan.per_round if ("per_round", k) in results]
    for r in sweep:
        lines.append(f"| {r.registered:,} | {r.per_round} | {r.round_seconds(1):.1f} | {r.round_seconds(2):.1f} | "
                     f"{mib(r.peak_rss)} | {mib(r.peak_process_rss)} | {r.processes} | {kb(r.round_bytes(1))} | "
                     f"{kb(r.round_bytes(2))} | {r.wall:.0f} |")
    cached = results[("cached", plan.cached_per_round)]
    on, off = results[("model", True)], results[("model", False)]
    lines += [
        "",
        "## Phase 1 with the embedding cache",
        "",
        "| model | registered | sampled / round | training clips / client | phase-1 round | round s (Flower part) | "
        "round s (with server) | peak RSS (tree) |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for run, what, model, speakers in ((cached, "cached", "tiny", 1), (off, "no cache", plan.model_name, plan.model_speakers),
                                       (on, "cached", plan.model_name, plan.model_speakers)):
        for k in (1, 2):
            state = what if k == 2 or what == "no cache" else "cache empty"
            lines.append(f"| {model} | {run.registered} | {run.per_round} | {per_speaker * speakers:.0f} | round {k}, {state} | "
                         f"{run.flower_seconds(k):.1f} | {run.round_seconds(k):.1f} | {mib(run.peak_rss)} |")
    lines += ["", "Round 1 of a run also starts the client actors and traces the model; round 2 of the same clients is "
              "the steady state." + (f" The {plan.model_name} rows group {plan.model_speakers} training speakers into "
                                     f"each client (`data.shards={plan.model_clients}`): the cache saves the backbone's "
                                     "passes over every chunk, so what it saves grows with the audio a client holds."
                                     if plan.model_speakers > 1 else "")]
    lines += ["", "## Verdicts", "", *verdicts(plan, results), "", "![seconds per round and peak RSS](scale.png)", ""]
    return "\n".join(lines)


def verdicts(plan: Plan, results: dict[tuple, RunResult]) -> list[str]:
    """The three targets, each met or missed by the measured numbers."""
    low, high = min(plan.registered), max(plan.registered)
    small, large = results[("registered", low)], results[("registered", high)]
    growth = large.peak_rss / small.peak_rss - 1
    cached = results[("cached", plan.cached_per_round)].round_seconds(2)
    on, off = results[("model", True)], results[("model", False)]
    speedup = off.flower_seconds(2) / max(on.flower_seconds(2), 1e-9)
    met = {True: "**met**", False: "**missed**"}
    return [
        f"- Peak RSS does not grow with registered clients (within 10 %): {met[growth <= 0.10]}: "
        f"{mib(small.peak_rss)} at {low:,} registered, {mib(large.peak_rss)} at {high:,} ({growth:+.1%}), "
        f"{plan.fixed_per_round} per round.",
        f"- A cached phase-1 round of {plan.cached_per_round} sampled clients (tiny preset) <= 30 s: "
        f"{met[cached <= 30]}: {cached:.1f} s (round 2 of the same clients, scoring and publishing included).",
        f"- Cached {plan.model_name} phase-1 round >= 10x faster than uncached after the first round: "
        f"{met[speedup >= 10]}: round 2 takes {on.flower_seconds(2):.1f} s cached, {off.flower_seconds(2):.1f} s "
        f"without the cache ({speedup:.1f}x; {on.per_round} clients, Flower part of the round).",
    ]


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def figure(plan: Plan, results: dict[tuple, RunResult]):
    """Left: seconds per round and peak RSS vs registered clients; right: seconds per round vs sampled clients."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), dpi=100)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    reg = [results[("registered", n)] for n in plan.registered]
    x = [r.registered for r in reg]
    left.plot(x, [r.round_seconds(1) for r in reg], "o-", label="phase-1 round s")
    left.plot(x, [r.round_seconds(2) for r in reg], "s-", label="phase-2 round s")
    left.set_xscale("log")
    left.set_xlabel(f"registered clients ({plan.fixed_per_round} per round)")
    left.set_ylabel("seconds per round")
    left.set_ylim(bottom=0)
    rss = left.twinx()
    rss.plot(x, [r.peak_rss / 2**30 for r in reg], "^--", color="tab:red", label="peak RSS (GiB)")
    rss.set_ylabel("peak RSS of the process tree (GiB)")
    rss.set_ylim(bottom=0)
    left.legend(loc="upper left", fontsize=7)
    rss.legend(loc="lower right", fontsize=7)
    top = max(plan.registered)
    per = [results[("registered", top)] if k == plan.fixed_per_round else results[("per_round", k)]
           for k in plan.per_round]
    k = [r.per_round for r in per]
    right.plot(k, [r.round_seconds(1) for r in per], "o-", label="phase-1 round s")
    right.plot(k, [r.round_seconds(2) for r in per], "s-", label="phase-2 round s")
    right.set_xlabel(f"sampled clients per round ({top:,} registered)")
    right.set_ylabel("seconds per round")
    right.set_ylim(bottom=0)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
