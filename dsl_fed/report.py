"""Run artefacts a person reads: ``metrics.json``, ``report.md`` and PNG plots (all written atomically).

Plots use matplotlib's object API with the Agg canvas directly (no pyplot), so nothing touches global
backend state and it works on headless machines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsl_fed.io import atomic_path, atomic_write


def write_metrics_json(path: Path, metrics: dict[str, Any]) -> Path:
    """Write `metrics` as indented JSON (numpy scalars/arrays converted)."""
    return atomic_write(path, json.dumps(_jsonable(metrics), indent=2) + "\n")


def plot_history(rows: Sequence[dict[str, Any]], path: Path, title: str = "training") -> Path:
    """Loss curves (train / devel) and devel UAR per epoch; a dashed line marks the start of phase 2."""
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_uar = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    for key, label in (("loss", "train loss"), ("val_loss", "devel loss (chunks)")):
        pts = [(r["epoch"], r[key]) for r in rows if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), marker=".", label=label)
    for key, label in (("accuracy", "train accuracy (chunks)"), ("val_uar", "devel UAR (clips)")):
        pts = [(r["epoch"], r[key]) for r in rows if key in r]
        if pts:
            ax_uar.plot(*zip(*pts), marker=".", label=label)
    phase2 = [r["epoch"] for r in rows if r.get("phase") == 2]
    for ax in (ax_loss, ax_uar):
        if phase2 and len(phase2) < len(rows):
            ax.axvline(phase2[0] - 0.5, color="grey", linestyle="--", linewidth=1, label="phase 2 starts")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.legend(fontsize=8)
    ax_loss.set_ylabel("cross-entropy")
    ax_uar.set_ylabel("score")
    ax_uar.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_rounds(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Federated devel (and test) UAR with its primary 95 % CI (``<part>_ci_level``) per round; phase 2 shaded."""
    rounds = [int(r["round"]) for r in rows]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    levels = set()
    for part, colour in (("devel", "tab:blue"), ("test", "tab:orange")):
        if not all(f"{part}_uar" in r for r in rows):
            continue
        uar, low, high = (np.array([float(r[f"{part}_{key}"]) for r in rows]) for key in ("uar", "ci_low", "ci_high"))
        levels.update(r.get(f"{part}_ci_level") or "clips" for r in rows)
        ax.plot(rounds, uar, marker="o", color=colour, label=f"{part} UAR")
        ax.fill_between(rounds, low, high, color=colour, alpha=0.15)
    phase2 = [k for k, r in zip(rounds, rows) if int(r["phase"]) == 2]
    if phase2:
        ax.axvspan(min(phase2) - 0.5, max(phase2) + 0.5, color="grey", alpha=0.1, label="phase 2")
    ax.set_xlabel("round")
    ax.set_ylabel(f"UAR, 95 % CI ({' / '.join(sorted(levels)) or 'clips'})")
    ax.set_ylim(0, 1)
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "confusion") -> Path:
    """Row-normalised confusion matrix (colour = recall share) annotated with the counts."""
    cm = np.asarray(matrix, dtype=np.float64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    fig = Figure(figsize=(1.2 * n + 2.5, 1.1 * n + 1.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of true class")
    fig.tight_layout()
    return save_figure(fig, path)


def render_report(name: str, metrics: dict[str, Any], plots: dict[str, str], command: str = "") -> str:
    """Markdown summary: UAR with speaker- and clip-level 95 % CIs per partition, confusion matrices, per-speaker UAR,
    plot links.

    Args:
        name: Run name (the title).
        metrics: ``{partition_label: clip_metrics_dict}`` plus optional ``"training"`` info.
        plots: ``{caption: relative path}``.
        command: The command line that produced the run (shown for reproducibility).
    """
    lines = [f"# Run `{name}`", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"> **Warning:** {w}" for w in metrics.get("warnings", [])] + ([""] if metrics.get("warnings") else [])
    results = {k: v for k, v in metrics.items() if isinstance(v, dict) and "uar" in v}
    lines += ["| partition | clips | UAR | 95 % CI (speakers) | 95 % CI (clips) | accuracy |", "|---|---|---|---|---|---|"]
    for part, m in results.items():
        lines.append(f"| {part} | {m['num_clips']} | {m['uar']:.3f} | {_primary_ci(m)} | {_clip_ci(m)} | "
                     f"{m['accuracy']:.3f} |")
    lines += ["", CI_NOTE] + [f"- {part}: {m['ci_note']}" for part, m in results.items() if "ci_note" in m] + [""]
    training = metrics.get("training")
    if isinstance(training, dict):
        lines += ["## Training", ""] + [f"- {k}: {v}" for k, v in training.items()] + [""]
    for part, m in results.items():
        classes = m["classes"]
        lines += [f"## {part}", "", "Confusion matrix (rows = true, columns = predicted):", ""]
        lines.append("| true \\ predicted | " + " | ".join(classes) + " |")
        lines.append("|---" * (len(classes) + 1) + "|")
        for label, row in zip(classes, m["confusion"]):
            lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
        lines += ["", "Per-speaker UAR: " + ", ".join(f"{s} {u:.3f}" for s, u in m["per_speaker"].items()), ""]
        if "speaker_spread" in m:
            lines += [spread_line(m["speaker_spread"]), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{caption}]({rel})" for caption, rel in plots.items()] + [""]
    return "\n".join(lines)


CI_NOTE = ("95 % CI: 1000x percentile bootstrap. (speakers): two-stage, resampling speakers with replacement, then "
           "each drawn speaker's clips; the primary interval, since clips of one speaker are not independent. "
           "(clips): resampling clips as if independent, narrower.")


def _primary_ci(m: dict[str, Any]) -> str:
    lo, hi = m["ci"]
    level = m.get("ci_level", "clips")  # metrics written before speaker-level intervals hold the clip-level one
    groups = f"{m['ci_groups']} " if "ci_groups" in m else ""
    return f"[{lo:.3f}, {hi:.3f}]" + ("" if level == "speakers" else f" ({groups}{level})")


def _clip_ci(m: dict[str, Any]) -> str:
    lo, hi = m.get("ci_clips", m["ci"])
    return f"[{lo:.3f}, {hi:.3f}]"


def spread_line(spread: dict[str, Any]) -> str:
    """One sentence with the per-speaker UAR spread (`dsl_fed.metrics.speaker_spread`)."""
    return (f"Speaker spread ({spread['speakers']} speakers): min {spread['min']:.3f}, median {spread['median']:.3f}, "
            f"max {spread['max']:.3f}, std {spread['std']:.3f}; worst 10 % ({', '.join(spread['worst_speakers'])}) "
            f"{spread['worst_10pct']:.3f}")


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG atomically (figures here are built without pyplot, so nothing to close)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
