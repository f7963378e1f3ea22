"""Poisoned clients vs aggregation strategies: final devel UAR per strategy x attack, table + PNG.

    python -m simulations.poisoning [--rounds 3] [--speakers 11] [--attacks sign-flip,scale,noise,label-flip]
        [--strategies fedavg,fedmedian,...] [--jobs 2] [--out benchmarks/results/poisoning.md] [section.key=value ...]

Each finished run is appended to ``runs/poisoning-cells.jsonl`` (``--cells``) with its settings, so an
interrupted grid continues where it stopped when started again with the same settings; runs go attack by attack.

The quickstart recipe on a demo corpus with one client per training speaker (by default 11 speakers: 7
clients, the fewest Bulyan accepts with one attacker), run in-process (`simulations.inprocess`): every strategy
without attacker, then with each attack. Client 0 is the attacker; every other client trains honestly. With Δ its honest
slice update and g the global slice it received, the attacker sends:

- ``sign-flip``: g − 10·Δ (the update reversed and boosted: an unboosted flip from 1 of 7 clients only slows a mean)
- ``scale``: g + 10·Δ
- ``noise``: g + N(0, 1) in every coordinate
- ``label-flip``: an honest update trained on labels shifted by one class

The attack is a hook of this experiment, not an option of the ClientApp; label-flip shifts labels within the
corpus's classes. Robust strategies run with ``federated.num_malicious=1`` (Krum, MultiKrum, Bulyan) and
``trim_fraction=0.2`` (FedTrimmedAvg: 1 of 7 cut at each end). The results header's counts (clients, speakers,
classes, chance, f) come from the corpus and the config (`simulations.run_setting`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from dsl_fed.federated import keras_client
from simulations.inprocess import run
from simulations.run_setting import RunSetting, run_setting

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yaml"
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "fedavgm")
ATTACKS = ("sign-flip", "scale", "noise", "label-flip")
ATTACKER = 0  # partition id of the poisoned client


def tamper_update(transform: Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray], seed: int):
    """A tamper hook that replaces the attacker's trained slice w by transform(g, w - g, rng)."""
    rng = np.random.default_rng(seed)

    def tamper(partition: int, msg: Message, honest: Callable[[Message], Message]) -> Message:
        reply = honest(msg)
        if partition != ATTACKER or reply.has_error():
            return reply
        received = next(iter(msg.content.array_records.values()))
        key, arrays = next(iter(reply.content.array_records.items()))
        poisoned = {}
        for name in arrays.keys():
            g = received[name].numpy().astype(np.float32)
            poisoned[name] = Array(np.asarray(transform(g, arrays[name].numpy().astype(np.float32) - g, rng), np.float32))
        reply.content[key] = ArrayRecord(poisoned)
        return reply

    return tamper


def label_flip(num_classes: int):
    """A tamper hook under which the attacker trains honestly on labels shifted by one class."""
    honest_chunks = keras_client.train_chunks

    def flipped_chunks(cfg, data, partition):
        chunks = honest_chunks(cfg, data, partition)
        return dataclasses.replace(chunks, labels=(chunks.labels + 1) % num_classes)

    def tamper(partition: int, msg: Message, honest: Callable[[Message], Message]) -> Message:
        if partition != ATTACKER:
            return honest(msg)
        with _patched(keras_client, "train_chunks", flipped_chunks):
            return honest(msg)

    return tamper


def attack_hook(attack: str | None, num_classes: int, seed: int = 0):
    if attack is None:
        return None
    if attack == "label-flip":
        return label_flip(num_classes)
    transforms = {
        "sign-flip": lambda g, d, rng: g - 10 * d,
        "scale": lambda g, d, rng: g + 10 * d,
        "noise": lambda g, d, rng: g + rng.normal(0.0, 1.0, g.shape),
    }
    return tamper_update(transforms[attack], seed)


def demo_corpus(folder: Path, speakers: int) -> Path:
    """A demo corpus of `speakers` speakers (about 60 % train, 20 % devel, 20 % test), made once."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        from dsl_fed.data.demo import make_demo_corpus

        make_demo_corpus(folder, speakers=speakers, progress=False)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="1 phase-1 round + the rest in phase 2")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one process each)")
    parser.add_argument("--speakers", type=int, default=11, help="demo corpus speakers (60 %% train = clients)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "poisoning.md")
    parser.add_argument("--cells", type=Path, default=REPO / "runs" / "poisoning-cells.jsonl",
                        help="finished runs, one JSON line each; a re-run with the same settings skips them")
    parser.add_argument("--write-only", action="store_true", help="write the table from the recorded runs, run none")
    parser.add_argument("overrides", nargs="*", help="further section.key=value settings")
    args = parser.parse_args(argv)
    strategies, attacks = args.strategies.split(","), args.attacks.split(",")
    manifest = demo_corpus(REPO / f"demo_data_{args.speakers}", args.speakers)
    base = [f"data.manifest={manifest}", "data.shards=0", "federated.phase1_rounds=1",
            f"federated.phase2_rounds={args.rounds - 1}", "federated.fraction_evaluate=0",
            "federated.num_malicious=1", "federated.trim_fraction=0.2", "output.name=poisoning", *args.overrides]
    cells = [(s, a) for a in ["none", *attacks] for s in strategies]  # a cut-short grid has whole attacks
    results = finished_cells(args.cells, base)
    todo = [cell for cell in cells if cell not in results and not args.write_only]
    print(f"{len(results)} of {len(cells)} runs already in {args.cells}; {len(todo)} to go", flush=True)
    setting = run_setting(CONFIG, base)
    # A fresh process per run (a reused one keeps TensorFlow's state and slows down run by run); `--jobs` at a time.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=spawn, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_cell, strategy, attack, base, setting.classes): (strategy, attack)
                   for strategy, attack in todo}
        for future in as_completed(futures):
            (strategy, attack), cell = futures[future], future.result()
            results[(strategy, attack)] = cell
            args.cells.parent.mkdir(parents=True, exist_ok=True)
            with args.cells.open("a") as f:  # appended as soon as it is done: an interrupted grid resumes
                f.write(json.dumps({"base": base, "strategy": strategy, "attack": attack, **cell}) + "\n")
            print(f"{strategy:>14} | attack {attack:>10} | devel UAR {cell['uar']:.3f} | {cell['seconds']:.0f} s "
                  f"({cell['cpu_seconds']:.0f} s CPU) | {len(results)}/{len(cells)}", flush=True)
    write_results(args, setting, strategies, ["none", *attacks], results)
    return 0


def finished_cells(path: Path, base: list[str]) -> dict[tuple[str, str], dict[str, float]]:
    """The runs `path` holds for exactly these settings."""
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    return {(r["strategy"], r["attack"]): {k: r[k] for k in ("uar", "seconds", "cpu_seconds")}
            for r in rows if r["base"] == base}


def run_cell(strategy: str, attack: str, base: list[str], num_classes: int) -> dict[str, float]:
    """One federated run: final devel UAR, wall-clock and CPU seconds."""
    cpu = time.process_time()
    hook = attack_hook(None if attack == "none" else attack, num_classes)
    outcome = run(CONFIG, [*base, f"federated.strategy={strategy}"], hook)
    return {"uar": outcome.devel_uar, "seconds": outcome.seconds, "cpu_seconds": time.process_time() - cpu}


def header(args: argparse.Namespace, setting: RunSetting, runs: int, cpu_minutes: float) -> str:
    """The command and what it ran on; every number comes from `args`, `setting` or the recorded runs."""
    command = " ".join(["python -m simulations.poisoning", f"--rounds {args.rounds}", f"--speakers {args.speakers}",
                        f"--strategies {args.strategies}", f"--attacks {args.attacks}", *args.overrides])
    f = setting.num_malicious
    return (
        f"`{command}`: quickstart recipe, {setting.corpus_speakers}-speaker demo corpus, {setting.clients_text()} "
        f"({setting.sampling_text()}; Krum and MultiKrum need at least 2f + 3 = {2 * f + 3}, Bulyan 4f + 3 = "
        f"{4 * f + 3} for f = {f} attacker{'' if f == 1 else 's'}), client {ATTACKER} attacks, {args.rounds} rounds "
        f"(1 + {args.rounds - 1}); final devel UAR ({setting.devel_text()}). {runs} runs, {cpu_minutes:.0f} "
        "CPU-minutes in all."
    )


def write_results(args: argparse.Namespace, setting: RunSetting, strategies: list[str], attacks: list[str],
                  results: dict[tuple[str, str], dict[str, float]]) -> None:
    from dsl_fed.io import atomic_write
    from dsl_fed.report import save_figure

    uar = {cell: r["uar"] for cell, r in results.items()}
    clean = uar[("fedavg", "none")]
    cpu_minutes = sum(r["cpu_seconds"] for r in results.values()) / 60
    lines = [
        "# Poisoned clients vs aggregation strategies",
        "",
        f"{header(args, setting, len(results), cpu_minutes)} "
        f"Machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}.",
        "",
        "| strategy | " + " | ".join(attacks) + " |",
        "|---|" + "---:|" * len(attacks),
    ]
    for strategy in strategies:
        cells = (f"{uar[(strategy, a)]:.3f}" if (strategy, a) in uar else "—" for a in attacks)
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += ["", f"At most 5 points below clean FedAvg ({clean:.3f}) under each attack:"]
    for attack in attacks[1:]:
        measured = [s for s in strategies if (s, attack) in uar]
        missing = ", ".join(s for s in strategies if s not in measured)
        cut = f" (not run with {missing}: the grid was cut short)" if missing else ""
        if not measured:
            lines.append(f"- {attack}: not run (the grid was cut short).")
            continue
        held = [s for s in measured if uar[(s, attack)] >= clean - 0.05]
        fedavg = "" if "fedavg" in held or "fedavg" not in measured else f"; FedAvg does not ({uar[('fedavg', attack)]:.3f})"
        lines.append(f"- {attack}: {', '.join(held) or 'none'}{fedavg}{cut}.")
    lines += ["", "![final devel UAR per strategy and attack](poisoning.png)", ""]
    atomic_write(args.out, "\n".join(lines))
    save_figure(_figure(strategies, attacks, uar, setting.chance), args.out.with_suffix(".png"))
    print("\n".join(lines))


def _figure(strategies: list[str], attacks: list[str], results: dict[tuple[str, str], float], chance: float):
    from matplotlib.figure import Figure

    attacks = [a for a in attacks if any((s, a) in results for s in strategies)]  # a cut-short grid: what ran
    fig = Figure(figsize=(8, 3.8), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / len(attacks)
    for i, attack in enumerate(attacks):
        xs = np.arange(len(strategies)) + (i - (len(attacks) - 1) / 2) * width
        ax.bar(xs, [results.get((s, attack), np.nan) for s in strategies], width, label=attack)
    ax.axhline(results[("fedavg", "none")], color="tab:blue", linestyle="--", linewidth=1, label="clean FedAvg")
    ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(np.arange(len(strategies)), strategies)
    ax.set_ylabel("final devel UAR")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=len(attacks) + 2, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    return fig


@contextlib.contextmanager
def _patched(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


if __name__ == "__main__":
    sys.exit(main())
