"""Federated benchmark: Flower/Ray overhead, bytes per round (phase 1 / phase 2 / full model, float32 vs
float16 on the wire), central vs federated UAR on the demo corpus, and a real deployment vs the simulation.

    python benchmarks/federated.py            # quickstart config, 10-speaker demo corpus (~5 min on 2 cores)
    python benchmarks/federated.py --quick    # 8 speakers, 1 + 1 rounds (~2 min)
    python benchmarks/federated.py --only deployment federated.phase2_rounds=5   # that section alone, 1 + 5 rounds

Three runs of ``configs/quickstart.yaml`` (or ``--config``) on a fresh demo corpus: central (`dsl_fed.central`),
federated float32 and federated float16 (`dsl_fed simulate`, one client per shard: ``data.shards``). Both modes
use the same config and are selected on devel alike: central at its best devel epoch, federated at its best
devel round (the table names both).
A fourth and a fifth run are the same job as a real deployment
(`dsl_fed deploy local`: SuperLink and one SuperNode per shard as separate processes over TLS with node
authentication, federated evaluation): with one long-lived ClientApp process per SuperNode (process isolation,
`deploy_local(isolation="process")`) and with Flower's default subprocess isolation (a new ClientApp process, TensorFlow
import and model build per message); both are compared with the float32 simulation per round, broken down into
local training, other client work, server work and the rest (messages, evaluation, process starts, polling).

Overhead (target: Flower/Ray <= 30 % of the wall time): per round, the wall time is the Flower part (messages,
local training, replies; ``seconds`` in history.csv) plus the server's scoring and publishing
(``server_seconds``). The clients' local training runs ``concurrency`` at a time (Ray CPUs / client CPUs), so
the training share of a round is ``sum(client train seconds) / concurrency``; what remains of the Flower part
is Flower/Ray overhead. Round 1 also pays for starting Ray and the client processes, reported separately,
as is the one-time start of the SuperLink and ServerApp (CLI wall time minus the rounds).
Writes ``benchmarks/results/federated.md`` (and prints it); the header records the machine load.
``--only deployment`` runs the float32 simulation and the deployment alone and replaces just that section of
the file, which then names its own run (command, date, load); the other sections keep theirs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "federated.md"
CONFIG = ROOT / "configs" / "quickstart.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8-speaker corpus, 1 + 1 rounds")
    parser.add_argument("--config", type=Path, default=CONFIG, help="YAML config (default: configs/quickstart.yaml)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", choices=["deployment"],
                        help="run only the simulation vs deployment comparison; replace that section of --out")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides (recorded)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    from dsl_fed.data.demo import make_demo_corpus
    from simulations.central_vs_federated import compare, markdown, run_federated

    started, load_before = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dsl_fed_fed_bench_") as tmp:
        work = Path(tmp)
        speakers, clips = (8, 3) if args.quick else (10, 6)
        manifest = make_demo_corpus(work / "demo", speakers=speakers, clips=clips, seed=0, progress=False)
        overrides = [f"data.manifest={manifest}", f"output.directory={work / 'runs'}", "output.name=bench",
                     *args.overrides]
        if args.quick:
            overrides += ["federated.phase1_rounds=1", "federated.phase2_rounds=1"]
        if args.only == "deployment":
            federated = run_federated(args.config, overrides + ["output.name=bench-federated"])
            deployed = run_deployments(args.config, overrides)
            section = deployment_section(federated, deployed, header(args, speakers, clips, started, load_before))
            report = replace_section(args.out.read_text() if args.out.is_file() else "# Federated benchmark", section)
        else:
            central, federated = compare(args.config, overrides)
            fp16 = run_federated(args.config, overrides + ["output.name=bench-fp16", "federated.transfer_dtype=float16"])
            deployed = run_deployments(args.config, overrides)
            report = "\n\n".join([
                "# Federated benchmark\n\n" + header(args, speakers, clips, started, load_before),
                "## Central vs federated (same config and seed; best devel epoch vs best devel round)\n\n" + markdown([central, federated]),
                "## Wall time vs local training (federated, float32)\n\n" + overhead_table(federated),
                "## Bytes on the wire\n\n" + bytes_table(args.config, overrides, federated, fp16),
                deployment_section(federated, deployed),
            ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    print(report)
    return 0


def header(args: argparse.Namespace, speakers: int, clips: int, started: float, load_before: float) -> str:
    """Which command ran when, under what load, on which config and corpus.

    The load before the run says whether something else was running (the run's own processes raise the load
    during it, so the load at the end says little): above 2 the timings are not worth quoting.
    """
    quiet = "quiet machine" if load_before <= 2 else "busy machine: re-run before quoting the timings"
    flags = (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "") + \
        "".join(f" {o}" for o in args.overrides)
    return (
        f"`python benchmarks/federated.py{flags}` on {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
        f"1-minute load average {load_before:.1f} before the run ({quiet}), {os.getloadavg()[0]:.1f} at its end, "
        f"{time.time() - started:.0f} s in total.\n"
        f"Config `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}` with "
        f"{'`federated.phase1_rounds=1 federated.phase2_rounds=1`, ' if args.quick else ''}"
        f"demo corpus {speakers} speakers x {clips} clips per class."
    )


DEPLOYMENT = "## Real deployment vs simulation (float32)"


def deployment_section(simulated, deployed: dict[str, tuple[Path, float]], provenance: str = "") -> str:
    """The deployment section; `provenance` (a `header`) when it is not from the run the file's header names."""
    intro = f"{provenance} The sections above are from the run named at the top.\n\n" if provenance else ""
    return f"{DEPLOYMENT}\n\n{intro}{deployment_table(simulated, deployed)}"


def replace_section(report: str, section: str) -> str:
    """`report` with its deployment section (up to the next ``## `` heading) replaced by `section`, or appended."""
    before, found, after = report.partition(DEPLOYMENT)
    rest = "\n\n" + after[after.index("\n## ") + 1:] if found and "\n## " in after else ""
    return before.rstrip() + "\n\n" + section + rest.rstrip()


def overhead_table(outcome) -> str:
    """Per-round wall time split into local training, other client work, server work and Flower/Ray overhead."""
    from dsl_fed.config import load_config
    from dsl_fed.federated.checkpoint import RunDirectory

    run = RunDirectory(outcome.run_dir)
    cfg = load_config(outcome.run_dir / "config.yaml")
    rows = run.read_history()
    clients = int(rows[0]["clients_sampled"])
    concurrency = max(1, min(clients, (os.cpu_count() or 1) // int(cfg.federated.client_cpus)))
    lines = [f"{clients} clients, {concurrency} at a time (Ray CPUs / federated.client_cpus); client times are "
             f"summed over clients and divided by {concurrency} to give their share of the wall time.", "",
             "| round | phase | wall s | local training s | other client work s | server s | Flower/Ray s | "
             "Flower/Ray overhead |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    steady = dict(wall=0.0, train=0.0, work=0.0, server=0.0, flower=0.0)
    for r in rows:
        flower_part, server = float(r["seconds"]), float(r["server_seconds"])
        train = float(r["client_seconds"]) / concurrency
        work = float(r["client_work_seconds"]) / concurrency
        wall, overhead = flower_part + server, flower_part - work
        lines.append(f"| {r['round']} | {r['phase']} | {wall:.1f} | {train:.1f} | {work - train:.1f} | {server:.1f} | "
                     f"{overhead:.1f} | {_pct(overhead, wall)} |")
        if int(r["round"]) > 1:
            for key, value in (("wall", wall), ("train", train), ("work", work), ("server", server),
                               ("flower", overhead)):
                steady[key] += value
    rounds_wall = sum(float(r["seconds"]) + float(r["server_seconds"]) for r in rows)
    n = max(1, len(rows) - 1)
    fixed = (steady["wall"] - steady["train"]) / n  # per-round cost that does not grow with local epochs
    lines += [
        "",
        f"- Rounds 2+ (steady state): Flower/Ray messaging {_pct(steady['flower'], steady['wall'])} of the wall time "
        f"(target <= 30 %); local training {_pct(steady['train'], steady['wall'])}; other client work (fresh model "
        f"per message, local UAR) {_pct(steady['work'] - steady['train'], steady['wall'])}; server scoring + TFLite "
        f"publishing {_pct(steady['server'], steady['wall'])}.",
        f"- Everything but local training costs about {fixed:.1f} s per round here, whatever the model does; with "
        f"at least {fixed * 7 / 3:.0f} s of local training per round (wall share) it is <= 30 % of the round. "
        f"The tiny demo model trains for only {steady['train'] / n:.1f} s per round.",
        f"- Whole run: {outcome.seconds:.0f} s wall for {sum(float(r['client_seconds']) for r in rows):.0f} s of "
        f"summed client training; {outcome.seconds - rounds_wall:.0f} s of it start SuperLink and ServerApp and build "
        f"the model before round 1, and round 1 also starts Ray and the client processes.",
    ]
    return "\n".join(lines)


def bytes_table(config: Path, overrides: list[str], fp32, fp16) -> str:
    """Model/slice sizes per client and the measured traffic of both federated runs."""
    from flwr.app import Array, ArrayRecord

    from dsl_fed.config import load_config
    from dsl_fed.data import read_manifest
    from dsl_fed.models import build_model, get_weights_by_name, weight_names
    from dsl_fed.federated.checkpoint import RunDirectory
    from dsl_fed.federated.server_app import slice_names

    cfg = load_config(config, overrides)
    model = build_model(cfg, len(read_manifest(cfg.data.manifest).classes))
    weights = get_weights_by_name(model, weight_names(model))

    def size(names, dtype):
        return ArrayRecord({n: Array(weights[n].astype(dtype)) for n in names}).count_bytes()

    slices = slice_names(model, cfg)
    lines = ["Payload per client and message (`ArrayRecord.count_bytes()`, .npy headers included):", "",
             "| payload | weights | float32 | float16 |", "|---|---:|---:|---:|"]
    for label, names in (("full model (sent once per client, always float32)", list(weights)),
                         ("phase 1 slice: head", slices[1]),
                         (f"phase 2 slice: head + top {cfg.training.unfrozen_layers} backbone layers", slices[2])):
        count = sum(weights[n].size for n in names)
        lines.append(f"| {label} | {count:,} | {size(names, 'float32') / 1e3:.1f} kB | {size(names, 'float16') / 1e3:.1f} kB |")
    lines += ["", "Measured per round (both directions, all clients):", "",
              "| round | phase | float32 up | float32 down | float16 up | float16 down | float16 / float32 |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(RunDirectory(fp32.run_dir).read_history(), RunDirectory(fp16.run_dir).read_history(), strict=True):
        up32, down32, up16, down16 = (int(a["bytes_up"]), int(a["bytes_down"]), int(b["bytes_up"]), int(b["bytes_down"]))
        lines.append(f"| {a['round']} | {a['phase']} | {up32 / 1e3:.1f} kB | {down32 / 1e3:.1f} kB | {up16 / 1e3:.1f} kB | "
                     f"{down16 / 1e3:.1f} kB | {(up16 + down16) / (up32 + down32):.2f} |")
    lines += ["", "Round 1 carries the full model to every client in float32 (so frozen weights match the server "
                  "exactly); from round 2 on only the slice travels and float16 halves it."]
    return "\n".join(lines)


def run_deployments(config: Path, overrides: list[str]) -> dict[str, tuple[Path, float]]:
    """`run_deployment` in process isolation (one long-lived ClientApp process per node), then in Flower's default."""
    return {isolation: run_deployment(config, overrides + [f"output.name=bench-deploy-{isolation}"], isolation)
            for isolation in ("process", "subprocess")}


def run_deployment(config: Path, overrides: list[str], isolation: str = "process") -> tuple[Path, float]:
    """`dsl_fed deploy local` with one SuperNode per training shard; returns (run folder, wall seconds)."""
    from dsl_fed.config import load_config
    from dsl_fed.deploy.local import deploy_local
    from dsl_fed.federated.run_config import count_shards

    start = time.perf_counter()
    nodes = count_shards(load_config(config, overrides))
    run_dir = deploy_local(config, overrides, nodes=nodes, echo=lambda line: print(line, file=sys.stderr),
                           isolation=isolation)
    return run_dir, time.perf_counter() - start


def deployment_table(simulated, deployed: dict[str, tuple[Path, float]]) -> str:
    """Seconds and bytes per round of the same job in the simulation and as separate processes over TLS, and
    where a steady-state round's time goes."""
    from dsl_fed.config import load_config
    from dsl_fed.federated.checkpoint import RunDirectory

    def per_round(run_dir: Path) -> dict[str, float]:
        rows = RunDirectory(run_dir).read_history()
        # Round 1 also starts the client processes. In a deployment round r is published once round r + 1's
        # exchange is out, so round 1's row holds two rounds of training and the last row only the last
        # evaluation: the rows in between are one round each.
        later = rows[1:-1] if len(rows) > 2 else rows[1:] or rows
        last = RunDirectory(run_dir).manifest(int(rows[-1]["round"]))["extra"]
        cfg = load_config(run_dir / "config.yaml")
        clients = int(rows[0]["clients_sampled"])
        if last.get("evaluation", {}).get("kind", "server") == "server":  # Ray: CPUs / client CPUs at a time
            concurrency = max(1, min(clients, (os.cpu_count() or 1) // int(cfg.federated.client_cpus)))
        else:  # one process per node, sharing the cores
            concurrency = max(1, min(clients, os.cpu_count() or 1))

        def mean(key: str) -> float:
            return sum(float(r[key]) for r in later) / len(later)

        steady = mean("seconds") + mean("server_seconds")
        train, work = mean("client_seconds") / concurrency, mean("client_work_seconds") / concurrency
        return {"rounds": len(rows), "round1": float(rows[0]["seconds"]) + float(rows[0]["server_seconds"]),
                "steady": steady, "train": train, "work": work - train, "server": mean("server_seconds"),
                "rest": steady - work - mean("server_seconds"),
                "bytes": sum(int(r["bytes_up"]) + int(r["bytes_down"]) for r in later) / len(later),
                "uar": last["devel"]["uar"], "evaluation": last.get("evaluation", {}).get("kind", "server")}

    sim = per_round(simulated.run_dir)
    rows = [("simulation (Ray, one process tree)", sim, simulated.seconds)]
    labels = {"process": "deployment, one ClientApp process per SuperNode (process isolation)",
              "subprocess": "deployment, a ClientApp process per message (Flower's default)"}
    deps = {isolation: per_round(run_dir) for isolation, (run_dir, _) in deployed.items()}
    rows += [(labels[isolation], deps[isolation], wall) for isolation, (_, wall) in deployed.items()]
    lines = ["SuperLink + SuperNodes as separate processes over TLS with node authentication; a steady-state round "
             "(rounds 2 to the last but one) split into local training and other client work (summed over "
             "clients, divided by how many run at once), server scoring + publishing (in a deployment it runs "
             "while the nodes wait for or work on the next round, so it overlaps the other columns), and the "
             "rest: messages, evaluation messages, process starts, polling. A deployment's round 1 column also "
             "holds round 2's exchange (round r is published once round r + 1's exchange is out).", "",
             "| mode | evaluation | round 1 s | s / round (steady) | local training s | other client work s | "
             "server s | rest s | bytes / round (steady) | devel UAR, last round | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row, wall in rows:
        lines.append(f"| {label} | {row['evaluation']} | {row['round1']:.1f} | {row['steady']:.1f} | "
                     f"{row['train']:.1f} | {row['work']:.1f} | {row['server']:.1f} | {row['rest']:.1f} | "
                     f"{row['bytes'] / 1e3:.1f} kB | {row['uar']:.3f} | {wall:.0f} |")
    lines.append("")
    for isolation, dep in deps.items():
        lines.append(f"- {labels[isolation][0].upper() + labels[isolation][1:]}: {dep['steady'] / sim['steady']:.2f}x the simulation's "
                     f"time per round, {dep['bytes'] / sim['bytes']:.2f}x its bytes per round.")
    lines += ["- The deployment's server holds no audio, so evaluation messages carry the slice to every node and "
              "confusion counts come back; the simulation scores on the server.",
              "- Wall time includes splitting the corpus, writing keys and starting SuperLink and SuperNodes."]
    return "\n".join(lines)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole > 0 else "-"


if __name__ == "__main__":
    sys.exit(main())
