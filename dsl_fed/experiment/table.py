"""The experiment's outputs: ``results.csv`` (one row per cell), ``table.md`` (the Table-3 analogue) and
``table.png`` (devel and test UAR per grid setting, central next to federated, mean ± std over seeds)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.experiment.cells import MODES, Cell, CellResult
from dsl_fed.io import atomic_write, atomic_write_csv

SELECTION = "central: best devel epoch, federated: best devel round; test UAR of that same model"


def result_rows(done: Sequence[tuple[Cell, str, CellResult]]) -> list[dict[str, Any]]:
    """One flat row per finished cell (the columns of ``results.csv``): ``*_ci_low/high`` is the primary 95 % CI
    over ``*_ci_level`` (speakers; nodes under federated evaluation), ``*_ci_clips_low/high`` the clip-level one."""
    rows = []
    for cell, cell_id, r in done:
        row: dict[str, Any] = {"cell": cell_id, "mode": cell.mode, "setting": cell.label, "seed": cell.seed}
        row.update({k: v for k, v in cell.settings})
        row.update({
            "selected": r.selected,
            "devel_uar": round(r.devel_uar, 4), "devel_ci_low": round(r.devel_ci[0], 4),
            "devel_ci_high": round(r.devel_ci[1], 4), "devel_ci_level": r.devel_ci_level,
            "devel_ci_clips_low": _r(r.devel_ci_clips and r.devel_ci_clips[0]),
            "devel_ci_clips_high": _r(r.devel_ci_clips and r.devel_ci_clips[1]),
            "test_uar": _r(r.test_uar), "test_ci_low": _r(r.test_ci and r.test_ci[0]),
            "test_ci_high": _r(r.test_ci and r.test_ci[1]), "test_ci_level": r.test_ci_level or "",
            "test_ci_clips_low": _r(r.test_ci_clips and r.test_ci_clips[0]),
            "test_ci_clips_high": _r(r.test_ci_clips and r.test_ci_clips[1]),
            "devel_worst_speaker_uar": _r(r.devel_worst_speaker),
            "test_worst_speaker_uar": _r(r.test_worst_speaker),
            "bytes_moved": r.bytes_moved, "traffic": r.traffic, "seconds": r.seconds, "run_dir": str(r.run_dir),
        })
        rows.append(row)
    return rows


ALL_SETTINGS = "all settings"


def summary(done: Sequence[tuple[Cell, str, CellResult]], pooled: bool = False) -> list[dict[str, Any]]:
    """Per grid setting (or, `pooled`, over all settings) and mode: cells, and mean / sample std of devel, test and
    worst-speaker UAR."""
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for cell, _, r in done:
        groups.setdefault((ALL_SETTINGS if pooled else cell.label, cell.mode), []).append(r)
    out = []
    for (label, mode), results in groups.items():
        entry: dict[str, Any] = {"setting": label, "mode": mode, "seeds": len(results)}
        for key in ("devel_uar", "test_uar", "devel_worst_speaker", "test_worst_speaker"):
            values = [getattr(r, key) for r in results if getattr(r, key) is not None]
            entry[key] = _mean_std(values)
        entry["bytes_moved"] = float(np.mean([r.bytes_moved for r in results]))
        entry["seconds"] = float(np.mean([r.seconds for r in results]))
        out.append(entry)
    return out


def markdown(name: str, done: Sequence[tuple[Cell, str, CellResult]], command: str = "") -> str:
    """``table.md``: settings x modes (mean ± std over seeds), then every cell with its primary 95 % CIs, each
    saying what it resampled."""
    settings = list(dict.fromkeys(cell.label for cell, _, _ in done))
    # A pooled row when there are several settings: one devel clip moves a small corpus' UAR by points, so a
    # gap per setting is noisier than the gap over the whole table.
    pooled = summary(done, pooled=True) if len(settings) > 1 else []
    stats = {(s["setting"], s["mode"]): s for s in [*summary(done), *pooled]}
    modes = [m for m in MODES if any(cell.mode == m for cell, _, _ in done)]
    seeds = sorted({cell.seed for cell, _, _ in done})
    lines = [f"# Experiment `{name}`", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Clip-level UAR, mean ± std over seeds {', '.join(map(str, seeds))} ({SELECTION}). Worst speaker: "
              "the lowest per-speaker UAR on devel / test."
              + (f" Last row: mean ± std over all cells of a mode ({len(settings)} settings x seeds)." if pooled else ""),
              ""]
    header = ["setting"]
    for mode in modes:
        header += [f"{mode} devel", f"{mode} test", f"{mode} worst speaker (devel / test)"]
    if len(modes) == 2:
        header += ["devel gap (fed - central)"]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for setting in [*settings, *([ALL_SETTINGS] if pooled else [])]:
        cells = [setting]
        for mode in modes:
            s = stats.get((setting, mode))
            cells += ([_fmt(s["devel_uar"]), _fmt(s["test_uar"]),
                       f"{_fmt(s['devel_worst_speaker'], std=False)} / {_fmt(s['test_worst_speaker'], std=False)}"]
                      if s else ["-", "-", "-"])
        if len(modes) == 2:
            c, f = stats.get((setting, "central")), stats.get((setting, "federated"))
            cells.append(f"{100 * (f['devel_uar'][0] - c['devel_uar'][0]):+.1f} points" if c and f else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Cells", "",
              CELL_CI_NOTE, "",
              "| mode | setting | seed | selected | devel UAR [95 % CI] | test UAR [95 % CI] | worst speaker devel / test "
              "| bytes moved | wall time |", "|---|---|---:|---|---|---|---|---:|---:|"]
    for cell, _, r in sorted(done, key=lambda d: (settings.index(d[0].label), MODES.index(d[0].mode), d[0].seed)):
        test = with_ci(r.test_uar, r.test_ci, r.test_ci_level) if r.test_uar is not None else "-"
        worst = f"{_f3(r.devel_worst_speaker)} / {_f3(r.test_worst_speaker)}"
        lines.append(f"| {cell.mode} | {cell.label} | {cell.seed} | {r.selected} | "
                     f"{with_ci(r.devel_uar, r.devel_ci, r.devel_ci_level)} | {test} | {worst} "
                     f"| {r.bytes_moved / 1e6:.2f} MB ({r.traffic}) | {r.seconds:.0f} s |")
    return "\n".join(lines) + "\n"


def plot(done: Sequence[tuple[Cell, str, CellResult]], path: Path, title: str) -> Path:
    """Grouped bars: devel and test UAR per setting and mode, error bars = std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dsl_fed.report import save_figure

    stats = {(s["setting"], s["mode"]): s for s in summary(done)}
    settings = list(dict.fromkeys(cell.label for cell, _, _ in done))
    bars = [(mode, part) for part in ("devel", "test") for mode in MODES
            if any(k[1] == mode and not np.isnan(v[f"{part}_uar"][0]) for k, v in stats.items())]
    fig = Figure(figsize=(max(6.0, 1.6 * len(settings) + 2), 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(bars))
    colours = {("central", "devel"): "#1f77b4", ("federated", "devel"): "#ff7f0e",
               ("central", "test"): "#aec7e8", ("federated", "test"): "#ffbb78"}
    x = np.arange(len(settings))
    for i, (mode, part) in enumerate(bars):
        means, stds = zip(*[stats.get((s, mode), {}).get(f"{part}_uar", (np.nan, np.nan)) for s in settings])
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, means, width, yerr=np.nan_to_num(stds), capsize=3,
               color=colours[(mode, part)], label=f"{mode} {part}")
    ax.set_xticks(x, labels=[s.replace(" ", "\n") for s in settings])
    ax.set_ylabel("UAR (mean ± std over seeds)")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(out_dir: Path, name: str, done: Sequence[tuple[Cell, str, CellResult]], command: str) -> None:
    """(Re)write ``results.csv``, ``table.md`` and ``table.png`` for the cells finished so far."""
    if not done:
        return
    atomic_write_csv(out_dir / "results.csv", result_rows(done))
    atomic_write(out_dir / "table.md", markdown(name, done, command))
    plot(done, out_dir / "table.png", f"{name}: {SELECTION}")


CELL_CI_NOTE = ("95 % CI: 1000x percentile bootstrap of the selected model's UAR; in brackets after it, what was "
                "resampled: (speakers) speakers, then each drawn speaker's clips; (nodes) under federated evaluation, "
                "where the server sees each node's confusion counts but no speakers, nodes, then their clips; "
                "(clips) clips as if independent. results.csv also holds the clip-level interval of every cell.")


def with_ci(value: float, ci: tuple[float, float], level: str | None) -> str:
    """``0.700 [0.400, 0.900] (speakers)``: a UAR, its primary 95 % CI and what that resampled."""
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({level or 'clips'})"


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return (float("nan"), float("nan"))
    return (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))


def _fmt(stat: tuple[float, float], std: bool = True) -> str:
    mean, sd = stat
    if np.isnan(mean):
        return "-"
    return f"{mean:.3f} ± {sd:.3f}" if std and not np.isnan(sd) else f"{mean:.3f}"


def _f3(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _r(value: float | None) -> float | str:
    return "" if value is None else round(float(value), 4)
