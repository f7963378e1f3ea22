"""Central vs federated training of the same config: devel/test UAR side by side, with the bytes each moved.

    python -m simulations.central_vs_federated configs/quickstart.yaml [section.key=value ...]

Central (`dsl_fed.central.run_central`, run ``<name>-central``) needs every training clip on one machine: its
traffic is the training audio itself (file bytes). Federated (`dsl_fed simulate`, run ``<name>-federated``,
test speakers scored every round) moves only model weights: the full model once per client, then the
trainable slice each round. Both start from the same config and seed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dsl_fed.config import Config, load_config


@dataclass(frozen=True)
class Outcome:
    """One training mode's scores and traffic."""

    mode: str
    devel_uar: float
    devel_ci: tuple[float, float]
    test_uar: float | None
    test_ci: tuple[float, float] | None
    bytes_moved: int
    traffic: str
    seconds: float
    run_dir: Path


def run_central(cfg: Config) -> Outcome:
    from dsl_fed.central import run_central as train_central
    from dsl_fed.data import read_manifest

    start = time.perf_counter()
    metrics = train_central(cfg, verbose=0)
    audio = sum(c.path.stat().st_size for c in read_manifest(cfg.data.manifest, seed=cfg.data.seed).partition("train"))
    test = metrics.get("test")
    return Outcome("central", metrics["devel"]["uar"], tuple(metrics["devel"]["ci"]), test and test["uar"],
                   test and tuple(test["ci"]), audio, "training audio uploaded", time.perf_counter() - start,
                   cfg.output.run_dir)


def run_federated(config_path: Path, overrides: list[str]) -> Outcome:
    from dsl_fed.cli.federated import simulate
    from dsl_fed.federated.checkpoint import RunDirectory

    start = time.perf_counter()
    run_dir = simulate(config_path, overrides)
    run = RunDirectory(run_dir)
    extra = run.manifest(run.latest_round())["extra"]
    moved = sum(int(r["bytes_up"]) + int(r["bytes_down"]) for r in run.read_history())
    test = extra.get("test")
    return Outcome("federated", extra["devel"]["uar"], tuple(extra["devel"]["ci"]), test and test["uar"],
                   test and tuple(test["ci"]), moved, "model weights up + down", time.perf_counter() - start, run_dir)


def compare(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[Outcome]:
    """Train centrally and federated on the same config; returns both outcomes."""
    config_path = Path(config_path)
    overrides = list(overrides)
    name = load_config(config_path, overrides).output.name
    central = run_central(load_config(config_path, overrides + [f"output.name={name}-central"]))
    federated = run_federated(config_path, overrides + [f"output.name={name}-federated", "federated.evaluate_test=true"])
    return [central, federated]


def markdown(outcomes: list[Outcome]) -> str:
    """The comparison as a markdown table."""
    lines = ["| mode | devel UAR [95 % CI] | test UAR [95 % CI] | bytes moved | what travels | wall time |",
             "|---|---|---|---:|---|---:|"]
    for o in outcomes:
        test = f"{o.test_uar:.3f} [{o.test_ci[0]:.3f}, {o.test_ci[1]:.3f}]" if o.test_uar is not None else "-"
        lines.append(f"| {o.mode} | {o.devel_uar:.3f} [{o.devel_ci[0]:.3f}, {o.devel_ci[1]:.3f}] | {test} | "
                     f"{o.bytes_moved / 1e6:.2f} MB | {o.traffic} | {o.seconds:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dsl_fed.errors import DslFedError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        print(markdown(compare(argv[0], argv[1:])))
    except DslFedError as exc:
        print(f"central_vs_federated: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
