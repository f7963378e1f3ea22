"""The paper's centralised protocol, end to end, writing one run folder.

1. Train phase 1 (head) and phase 2 (head + top backbone layers) on ``train``; after every epoch score the
   ``devel`` clips and keep the best epoch (model selection on devel).
2. Report devel and test UAR with 95 % bootstrap CI and per-speaker UAR of the selected model.
3. With ``fuse_dev``: build a fresh model and retrain it on train + devel with the selected setting - the
   same config and, per phase, the number of epochs that was best on devel (phase 2 is skipped if it never
   beat phase 1) - then report test for it, as in the paper. The devel-selected model stays in
   ``checkpoints/best.keras``; ``model.keras`` is always the model whose test result is reported.

Run folder ``cfg.output.run_dir``: ``config.yaml``, ``history.csv`` (+ ``fused/history.csv``),
``checkpoints/best.keras``, ``model.keras``, ``metrics.json``, ``report.md``, ``plots/*.png``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from dsl_fed.config import Config
from dsl_fed.data.manifest import Manifest, load_manifest
from dsl_fed.data.pipeline import ChunkSet, load_chunks
from dsl_fed.embedding_cache import EmbeddingCache, for_config, run_folder
from dsl_fed.io import atomic_path, atomic_write, read_history, refuse_existing, run_lock, staged_run
from dsl_fed.metrics import evaluate_chunks
from dsl_fed.models import build_model
from dsl_fed.report import plot_confusion, plot_history, render_report, write_metrics_json
from dsl_fed.train import HISTORY_FILE, train_local


def run_central(cfg: Config, fuse_dev: bool = False, verbose: int = 1, command: str = "",
                overwrite: bool = False) -> dict[str, Any]:
    """Run the central protocol and write the run folder; returns the content of ``metrics.json``.

    All data are read before the run folder is touched; the run is written into a staging folder and replaces
    an earlier run of the same name only when it has finished (`dsl_fed.io.staged_run`).

    Args:
        cfg: Validated config (``output.directory`` / ``output.name`` name the run folder).
        fuse_dev: Also retrain on train + devel and report test for that model.
        verbose: Keras progress output (0, 1 or 2).
        command: Command line recorded in ``report.md``.
        overwrite: Replace an earlier run of the same name (else that is an error, raised before training).
    """
    start = time.perf_counter()
    refuse_existing(cfg.output.run_dir, overwrite)
    manifest, train, devel, test = load_partitions(cfg, progress=verbose > 0)
    classes = manifest.classes
    with run_lock(cfg.output.run_dir), staged_run(cfg.output.run_dir, overwrite) as run_dir:
        atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        return _train_and_report(cfg, run_dir, train, devel, test, classes, manifest.warnings, fuse_dev, verbose,
                                 command, start)


def _train_and_report(cfg: Config, run_dir: Path, train: ChunkSet, devel: ChunkSet, test: ChunkSet | None,
                      classes: list[str], warnings: list[str], fuse_dev: bool, verbose: int, command: str,
                      start: float) -> dict[str, Any]:
    model = build_model(cfg, len(classes))
    cache = for_config(run_folder(cfg), cfg)
    phase1 = train_local(model, train, devel, cfg, phase=1, run_dir=run_dir, verbose=verbose, cache=cache)
    phase2 = None
    if cfg.training.phase2_epochs > 0:
        phase2 = train_local(
            model, train, devel, cfg, phase=2, run_dir=run_dir, verbose=verbose, initial_best=phase1.val_metrics["uar"]
        )

    seed = cfg.training.seed
    metrics: dict[str, Any] = {"run": cfg.output.name, "config_hash": cfg.hash(), "classes": classes,
                               "warnings": warnings}
    metrics["devel"] = evaluate_chunks(model, devel, classes, cfg.training.batch_size, seed=seed)
    if test is not None:
        metrics["test"] = evaluate_chunks(model, test, classes, cfg.training.batch_size, seed=seed)
    training: dict[str, Any] = {
        "train_chunks": len(train),
        "devel_chunks": len(devel),
        "phase1_epochs": phase1.epochs,
        "phase1_best_epoch": phase1.best_epoch,
        "phase2_epochs": phase2.epochs if phase2 else 0,
        "phase2_best_epoch": phase2.best_epoch if phase2 else 0,
    }

    if fuse_dev:
        epochs = (phase1.best_epoch or 0, (phase2.best_epoch or 0) if phase2 else 0)
        model = _train_fused(cfg, ChunkSet.concat([train, devel]), len(classes), epochs, run_dir / "fused", verbose,
                             cache)
        training["fused_epochs"] = list(epochs)
        if test is not None:
            metrics["test_train_only"] = metrics.pop("test")
            metrics["test"] = evaluate_chunks(model, test, classes, cfg.training.batch_size, seed=seed)
    with atomic_path(run_dir / "model.keras") as tmp:
        model.save(tmp)

    training["seconds"] = round(time.perf_counter() - start, 1)
    metrics["training"] = training
    write_metrics_json(run_dir / "metrics.json", metrics)
    plots = _write_plots(run_dir, metrics, fuse_dev)
    atomic_write(run_dir / "report.md", render_report(cfg.output.name, metrics, plots, command))
    return metrics


def _train_fused(cfg: Config, chunks: ChunkSet, num_classes: int, epochs: tuple[int, int], out: Path, verbose: int,
                 cache: EmbeddingCache | None = None):
    model = build_model(cfg, num_classes)
    train_local(model, chunks, None, cfg, phase=1, epochs=epochs[0], run_dir=out, verbose=verbose, cache=cache)
    if epochs[1] > 0:
        train_local(model, chunks, None, cfg, phase=2, epochs=epochs[1], run_dir=out, verbose=verbose)
    return model


def _write_plots(run_dir: Path, metrics: dict[str, Any], fuse_dev: bool) -> dict[str, str]:
    plots: dict[str, str] = {}
    history = run_dir / HISTORY_FILE
    if history.is_file():
        plot_history(read_history(history), run_dir / "plots" / "training.png", "training on train, selection on devel")
        plots["training curves"] = "plots/training.png"
    fused = run_dir / "fused" / HISTORY_FILE
    if fuse_dev and fused.is_file():
        plot_history(read_history(fused), run_dir / "plots" / "training_fused.png", "retraining on train + devel")
        plots["training curves (train + devel)"] = "plots/training_fused.png"
    return {**plots, **confusion_plots(run_dir, metrics)}


def load_partitions(cfg: Config, progress: bool = True) -> tuple[Manifest, ChunkSet, ChunkSet, ChunkSet | None]:
    """The config's corpus (its warnings printed to stderr) and its train, devel and test chunks (test: None if empty)."""
    manifest = load_manifest(cfg.data)
    for warning in manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    classes = manifest.classes
    train = load_chunks(manifest.partition("train", required=True), cfg.data, classes, progress=progress)
    devel = load_chunks(manifest.partition("devel", required=True), cfg.data, classes, progress=progress)
    test_clips = manifest.partition("test")
    test = load_chunks(test_clips, cfg.data, classes, progress=progress) if test_clips else None
    return manifest, train, devel, test


def confusion_plots(run_dir: Path, metrics: dict[str, Any]) -> dict[str, str]:
    """``plots/confusion_<part>.png`` for every scored partition; returns ``{caption: relative path}``."""
    plots = {}
    for part in ("devel", "test", "test_train_only"):
        if part in metrics:
            m = metrics[part]
            plot_confusion(m["confusion"], m["classes"], run_dir / "plots" / f"confusion_{part}.png", f"{part}: UAR {m['uar']:.3f}")
            plots[f"confusion matrix ({part})"] = f"plots/confusion_{part}.png"
    return plots


__all__ = ["run_central", "load_partitions", "confusion_plots"]
