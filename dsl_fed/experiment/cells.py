"""One experiment cell: a config (grid setting + seed) trained centrally or federated, scored like for like.

Both modes select on devel the way the paper does: central keeps its best devel epoch (`dsl_fed.central`),
federated keeps its best devel round (the first round with the highest devel UAR among the rounds scored on the
full devel set, `dsl_fed.federated.checkpoint.best_round`; the server scores every round on devel and, here,
test). Test UAR is always that of the selected model, so neither mode reports its last epoch/round while the
other reports its best. The 95 % CIs are the primary ones of the scores (``ci_level``: speakers, or nodes
under federated evaluation) and the clip-level ones.

This module does not import Flower: federated cells drive ``dsl_fed simulate``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsl_fed.config import Config, load_config
from dsl_fed.errors import DslFedError

MODES = ("central", "federated")


FEDERATED_ONLY = ("federated.", "robustness.", "data.shards")  # settings that leave central training unchanged

@dataclass(frozen=True)
class CellResult:
    """Scores and costs of one trained cell (``devel`` / ``test``: UAR of the selected model).

    ``*_ci`` is the primary 95 % CI, resampling ``*_ci_level`` (speakers, nodes, or clips for cells finished
    before speaker-level intervals existed); ``*_ci_clips`` the clip-level one.
    """

    mode: str
    devel_uar: float
    devel_ci: tuple[float, float]
    test_uar: float | None
    test_ci: tuple[float, float] | None
    devel_worst_speaker: float | None  # lowest per-speaker UAR (None if the evaluation had no speakers)
    test_worst_speaker: float | None
    selected: str  # "epoch 12/16" or "round 9/11"
    bytes_moved: int
    traffic: str
    seconds: float
    run_dir: Path
    devel_ci_level: str = "clips"
    devel_ci_clips: tuple[float, float] | None = None
    test_ci_level: str | None = None
    test_ci_clips: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "run_dir": str(self.run_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CellResult":
        data = dict(data)
        for key in ("devel_ci", "test_ci", "devel_ci_clips", "test_ci_clips"):
            data[key] = tuple(data[key]) if data.get(key) is not None else None
        data["run_dir"] = Path(data["run_dir"])
        return cls(**data)


@dataclass(frozen=True)
class Cell:
    """A grid setting (``(key, value)`` overrides) x seed x mode."""

    mode: str
    settings: tuple[tuple[str, str], ...]
    seed: int

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.settings] + [f"training.seed={self.seed}"]

    @property
    def label(self) -> str:
        """The grid setting in short form, e.g. ``cutmix=true specaugment=false`` (``base`` without a setting)."""
        return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.settings) or "base"

    def cell_id(self, cfg: Config) -> str:
        """Folder name: readable, and tied to the sections of the resolved config that shape this mode's result,
        so a changed base config never reuses a cell, and configs differing only in federated settings share
        their central cell."""
        central = self.mode == "central"
        ignored = {"output", "experiment"} | ({"federated", "robustness"} if central else set())
        settings = {k: v for k, v in cfg.to_dict().items() if k not in ignored}
        if central:  # how the training speakers would be split into clients does not shape central training
            settings["data"] = {k: v for k, v in settings["data"].items() if k != "shards"}
        digest = hashlib.sha256(json.dumps([self.mode, settings], sort_keys=True).encode()).hexdigest()[:8]
        slug = "_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in self.settings
                        if not central or not k.startswith(FEDERATED_ONLY))
        slug = "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in slug)[:60]
        return "-".join(part for part in (self.mode, slug, f"seed{self.seed}", digest) if part)


def run_central(cfg: Config, overwrite: bool = False) -> CellResult:
    """Central training (`dsl_fed.central.run_central`, best devel epoch) of `cfg` into its run folder
    (`overwrite`: replace an earlier run of that name)."""
    from dsl_fed.central import run_central as train_central
    from dsl_fed.data import load_manifest

    start = time.perf_counter()
    metrics = train_central(cfg, verbose=0, overwrite=overwrite)
    audio = sum(c.path.stat().st_size for c in load_manifest(cfg.data).partition("train"))
    t = metrics["training"]
    best = t["phase1_epochs"] + t["phase2_best_epoch"] if t["phase2_best_epoch"] else t["phase1_best_epoch"]
    return _result("central", metrics.get("devel"), metrics.get("test"), f"epoch {best}/{t['phase1_epochs'] + t['phase2_epochs']}",
                   audio, "training audio uploaded", time.perf_counter() - start, cfg.output.run_dir)


def run_federated(config_path: str | Path, overrides: list[str], ray_cpus: int | None = None,
                  overwrite: bool = False) -> CellResult:
    """A federated run (`dsl_fed simulate`, test speakers scored every round) reported at its best devel round.

    Args:
        config_path: YAML config.
        overrides: ``section.key=value`` overrides (``output.*`` names the run folder).
        ray_cpus: CPUs of the simulation's own Ray instance (None: all of this machine's).
        overwrite: Replace an earlier run of that name.
    """
    from dsl_fed.cli.federated import simulate
    from dsl_fed.data import load_manifest
    from dsl_fed.federated.checkpoint import RunDirectory

    cfg = load_config(config_path, overrides)
    has_test = bool(load_manifest(cfg.data).partition("test"))
    start = time.perf_counter()
    run_dir = simulate(config_path, [*overrides, f"federated.evaluate_test={str(has_test).lower()}"],
                       echo=lambda line: None, overwrite=overwrite, ray_cpus=ray_cpus)
    run = RunDirectory(run_dir)
    rows = run.read_history()
    best = best_round(rows)
    extra = run.manifest(best)["extra"]
    moved = sum(int(r["bytes_up"]) + int(r["bytes_down"]) for r in rows)
    return _result("federated", extra.get("devel"), extra.get("test"), f"round {best}/{len(rows)}", moved,
                   "model weights up + down", time.perf_counter() - start, run_dir)


def best_round(rows: list[dict[str, str]]) -> int:
    """The round the run's ``best`` names, from its ``history.csv``: the highest devel UAR among the rounds scored
    on the full devel set (the earliest one on ties)."""
    from dsl_fed.federated.checkpoint import best_round as select

    best = select(rows)
    if best is None:
        raise DslFedError("the federated run has no round with devel scores in history.csv")
    return best


def _result(mode: str, devel: dict | None, test: dict | None, selected: str, moved: int, traffic: str,
            seconds: float, run_dir: Path) -> CellResult:
    if devel is None:
        raise DslFedError(f"{run_dir}: the {mode} run has no devel scores")
    return CellResult(
        mode=mode,
        devel_uar=float(devel["uar"]),
        devel_ci=_pair(devel["ci"]),
        test_uar=float(test["uar"]) if test else None,
        test_ci=_pair(test["ci"]) if test else None,
        devel_worst_speaker=_worst(devel),
        test_worst_speaker=_worst(test),
        selected=selected,
        bytes_moved=int(moved),
        traffic=traffic,
        seconds=round(seconds, 1),
        run_dir=Path(run_dir),
        devel_ci_level=devel.get("ci_level", "clips"),
        devel_ci_clips=_pair(devel.get("ci_clips", devel["ci"])),
        test_ci_level=test.get("ci_level", "clips") if test else None,
        test_ci_clips=_pair(test.get("ci_clips", test["ci"])) if test else None,
    )


def _pair(values) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def _worst(scores: dict | None) -> float | None:
    per_speaker = (scores or {}).get("per_speaker")
    return float(min(per_speaker.values())) if per_speaker else None
