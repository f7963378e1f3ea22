"""Per-round outputs of a federated run, written so that a crash never leaves a half-written round.

Layout of ``runs/<name>/``::

    config.yaml                 resolved config of the run
    round_<k>/model.keras       full global model after round k (what `--resume` restarts from)
    round_<k>/model.tflite      the same model for devices (raw audio in, probabilities out)
    round_<k>/manifest.json     export manifest + ``extra``: round, phase, devel/test UAR with CI,
                                per-speaker UAR, clients, bytes up/down of the round
    round_<k>/strategy_state.npz  server optimiser moments (FedAdam/FedYogi only)
    latest -> round_<k>         symlink to the last complete round
    best -> round_<k>           symlink to the round with the best devel UAR so far among the rounds scored
                                on the full devel set (`best_round`; earliest on ties)
    history.csv                 one row per round
    plots/federated_uar.png     devel (and test) UAR per round

A round is assembled in a hidden temporary folder and renamed into place in one step; ``latest`` moves only
afterwards, so it always names a complete round.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dsl_fed.config import Config
from dsl_fed.errors import DslFedError, first_line
from dsl_fed.io import atomic_write_csv, read_history

LATEST = "latest"
BEST = "best"
HISTORY = "history.csv"
PLOT = "plots/federated_uar.png"
STRATEGY_STATE = "strategy_state.npz"


def round_name(k: int) -> str:
    return f"round_{k}"


class RunDirectory:
    """Reads and writes the per-round outputs of one federated run (``cfg.output.run_dir``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def round_dir(self, k: int) -> Path:
        return self.path / round_name(k)

    def latest_round(self) -> int | None:
        """The last complete round, or None if the run has none."""
        link = self.path / LATEST
        if not link.is_symlink():
            return None
        target = os.readlink(link)
        try:
            k = int(Path(target).name.removeprefix("round_"))
        except ValueError:
            raise DslFedError(f"{link}: points to {target!r}, not to a round_<k> folder") from None
        if not (self.round_dir(k) / "model.keras").is_file():
            raise DslFedError(f"{link}: points to {target!r}, which has no model.keras")
        return k

    def manifest(self, k: int) -> dict[str, Any]:
        path = self.round_dir(k) / "manifest.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DslFedError(f"{path}: cannot read the round manifest ({exc})") from None

    def strategy_state(self, k: int) -> dict[str, np.ndarray]:
        path = self.round_dir(k) / STRATEGY_STATE
        if not path.is_file():
            return {}
        with np.load(path) as data:
            return {name: data[name] for name in data.files}

    def best_round(self) -> int | None:
        """The round ``best`` points to, or None."""
        link = self.path / BEST
        return int(os.readlink(link).removeprefix("round_")) if link.is_symlink() else None

    def check_new(self) -> None:
        """Refuse to start a run over an earlier one of the same name (`dsl_fed simulate --overwrite` and
        `dsl_fed deploy local --overwrite` stage a new run and replace the old one only when it has finished)."""
        if self.path.is_dir() and any(p.name != "logs" for p in self.path.iterdir()):  # logs: this run's own
            raise DslFedError(f"{self.path}: holds an earlier run of this name; resume it (--resume, or resume=true "
                              "in the run config), choose another output.name, or replace it (--overwrite)")

    def check_resume(self, cfg: Config) -> int:
        """The round a resumed run of `cfg` continues from; raises unless the run exists with the same config."""
        k = self.latest_round() if self.path.is_dir() else None
        if k is None:
            raise DslFedError(f"{self.path}: no complete round to resume from; start without resume")
        saved_path = self.path / "config.yaml"
        if not saved_path.is_file():
            raise DslFedError(f"{saved_path}: missing, so the run's config cannot be compared; start without resume")
        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DslFedError(f"{saved_path}: not valid YAML ({first_line(exc)}); start without resume") from None
        changed = _changed_keys(_with_defaults(saved), cfg.to_dict())
        if changed:
            raise DslFedError(f"{saved_path}: resuming needs the same config, but {', '.join(changed)} changed")
        _check_readable(self.round_dir(k) / "model.keras", self.path / HISTORY)
        return k

    def write_round(
        self,
        k: int,
        write_files: Callable[[Path], None],
        strategy_state: Mapping[str, np.ndarray] | None = None,
    ) -> Path:
        """Assemble round `k` in a temporary folder, move it into place, then point ``latest`` at it.

        Args:
            k: Round number.
            write_files: Writes ``model.keras``, ``model.tflite`` and ``manifest.json`` into the folder it gets.
            strategy_state: Server optimiser arrays to keep for resuming (skipped when empty).
        """
        final = self.round_dir(k)
        tmp = self.path / f".{round_name(k)}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write_files(tmp)
            if strategy_state:
                np.savez(tmp / STRATEGY_STATE, **dict(strategy_state))
            if final.exists():  # left by a run that died between this rename and moving `latest`
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._point(LATEST, k)
        return final

    def point_best(self, k: int) -> None:
        """Point ``best`` at round `k` (a complete round)."""
        self._point(BEST, k)

    def _point(self, name: str, k: int) -> None:
        link_tmp = self.path / f".{name}.tmp"
        link_tmp.unlink(missing_ok=True)
        os.symlink(round_name(k), link_tmp)
        os.replace(link_tmp, self.path / name)

    # ------------------------------------------------------------------------------------------- history

    def read_history(self) -> list[dict[str, Any]]:
        return read_history(self.path / HISTORY)

    def append_history(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Add the row of round ``row["round"]`` (dropping rows of that round or later: a resumed run redoes
        them) and rewrite ``history.csv`` atomically. Returns all rows."""
        k = int(row["round"])
        rows: list[dict[str, Any]] = [r for r in self.read_history() if int(r["round"]) < k]
        rows.append(dict(row))
        atomic_write_csv(self.path / HISTORY, rows)
        return rows


def _check_readable(model: Path, history: Path) -> None:
    """What a resumed server reads first must be intact, or the run would fail inside Flower with a bare
    traceback: the round's model (a complete Keras zip) and ``history.csv`` (a whole number in every ``round``)."""
    import zipfile

    try:
        with zipfile.ZipFile(model) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        bad = first_line(exc)
    if bad is not None:
        raise DslFedError(f"{model}: damaged ({bad}); resume from an intact round (point `latest` at it) or start "
                          "without resume")
    try:
        rows = read_history(history)
    except (csv.Error, UnicodeDecodeError, OSError) as exc:
        raise DslFedError(f"{history}: unreadable ({first_line(exc)}); start without resume") from None
    for line, row in enumerate(rows, start=2):
        if not isinstance(row.get("round"), int):
            raise DslFedError(f"{history} line {line}: no whole number in column 'round' (columns: "
                              f"{', '.join(row) or 'none'}); the run's history is damaged, start without resume")


def _with_defaults(saved: Any) -> dict[str, Any]:
    """A saved config as it reads today: a key added since it was written has its default (which the run used)."""
    defaults = Config().to_dict()
    merged = dict(defaults)
    for section, values in (saved.items() if isinstance(saved, dict) else ()):
        if not (isinstance(values, dict) and isinstance(defaults.get(section), dict)):
            merged[section] = values
            continue
        merged[section] = {**defaults[section], **values}
        for key, value in values.items():  # a sub-section such as federated.dp
            if isinstance(value, dict) and isinstance(defaults[section].get(key), dict):
                merged[section][key] = {**defaults[section][key], **value}
    return merged


def best_round(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """The round ``best`` names: the highest devel UAR among the rounds scored on the full devel set (the earliest
    on ties), or None when no round has devel scores.

    Rounds compare only on the same clips. With federated evaluation, a round in which an evaluation node did not
    answer is scored on fewer clips and speakers, and can look better by chance (without its hardest speaker,
    say). Each node's clips are fixed, so the full set is the one with the most devel clips of the run, and a
    round is eligible when its clips per class (``devel_support`` in ``history.csv``) are that set's. A node
    heard from for the first time in a later round makes the earlier rounds ineligible, and ``best`` moves.

    Args:
        rows: ``history.csv`` rows (``round``, ``devel_uar``, ``devel_support``); rows written before
            ``devel_support`` existed all count as the same set.
    """
    scored = [r for r in rows if r.get("devel_uar") not in ("", None)]
    if not scored:
        return None
    full = full_devel_support(scored)
    eligible = [r for r in scored if devel_support(r) == full]
    return int(max(eligible, key=lambda r: (float(r["devel_uar"]), -int(r["round"])))["round"])


def full_devel_support(rows: Sequence[Mapping[str, Any]]) -> str:
    """``devel_support`` of the round scored on the most devel clips (the earliest such round)."""
    return devel_support(max(rows, key=lambda r: (sum(int(n) for n in devel_support(r).split()), -int(r["round"]))))


def devel_support(row: Mapping[str, Any]) -> str:
    """A row's devel clips per class, e.g. ``"12 12 11"`` (`read_history` turns a single number into an int)."""
    return " ".join(str(row.get("devel_support", "")).split())


def _changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``section.key`` entries that differ (the output location may move)."""
    return sorted(
        f"{section}.{key}"
        for section, values in current.items() if section != "output"
        for key, value in values.items()
        if (saved.get(section) or {}).get(key) != value
    )
