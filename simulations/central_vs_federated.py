"""Central vs federated training of the same config: devel/test UAR side by side, with the bytes each moved.

    python -m simulations.central_vs_federated configs/quickstart.yaml [section.key=value ...]

Central (`dsl_fed.central.run_central`, run ``<name>-central``) needs every training clip on one machine: its
traffic is the training audio itself (file bytes). Federated (`dsl_fed simulate`, run ``<name>-federated``,
test speakers scored every round) moves only model weights: the full model once per client, then the
trainable slice each round. Both start from the same config and seed, and both are selected on devel like
for like: central reports its best devel epoch, federated its best devel round (`dsl_fed.experiment.cells`);
the table names the epoch / round each mode selected. `dsl_fed experiment` runs the same comparison over
a grid and seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dsl_fed.config import load_config
from dsl_fed.experiment.cells import CellResult, run_central, run_federated
from dsl_fed.experiment.table import CELL_CI_NOTE, with_ci

__all__ = ["compare", "markdown", "run_central", "run_federated"]


def compare(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[CellResult]:
    """Train centrally and federated on the same config; returns both outcomes."""
    config_path = Path(config_path)
    overrides = list(overrides)
    name = load_config(config_path, overrides).output.name
    central = run_central(load_config(config_path, overrides + [f"output.name={name}-central"]))
    federated = run_federated(config_path, overrides + [f"output.name={name}-federated"])
    return [central, federated]


def markdown(outcomes: list[CellResult]) -> str:
    """The comparison as a markdown table (each mode's devel-selected model: best epoch / best round)."""
    lines = ["| mode | selected on devel | devel UAR [95 % CI] | test UAR [95 % CI] | worst speaker devel / test "
             "| bytes moved | what travels | wall time |", "|---|---|---|---|---|---:|---|---:|"]
    for o in outcomes:
        test = with_ci(o.test_uar, o.test_ci, o.test_ci_level) if o.test_uar is not None else "-"
        worst = " / ".join("-" if v is None else f"{v:.3f}" for v in (o.devel_worst_speaker, o.test_worst_speaker))
        lines.append(f"| {o.mode} | best {o.selected} | {with_ci(o.devel_uar, o.devel_ci, o.devel_ci_level)} | "
                     f"{test} | {worst} | {o.bytes_moved / 1e6:.2f} MB | {o.traffic} | {o.seconds:.0f} s |")
    return "\n".join(lines + ["", CELL_CI_NOTE])


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
