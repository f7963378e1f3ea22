"""The paper's reference system: DeepSpectrum + SVM (CNN embeddings of the spectrogram images, a linear SVM).

DeepSpectrumLite is compared against DeepSpectrum, which feeds the same kind of spectrogram image through an
ImageNet CNN, keeps the pooled features and trains a linear SVM whose complexity C is chosen on devel. Here
the embeddings come from exactly the configured front end and backbone (`SpectrogramImage` + the backbone's
average-pooled output, `dsl_fed.models.build_embedder`) on exactly the chunks training uses; scikit-learn's
``StandardScaler`` + ``LinearSVC`` is the classifier. Chunk decision scores are averaged per clip, as chunk
probabilities are for the network, and clips are scored with the same UAR, bootstrap CI and per-speaker
report as ``train --central``.

Run folder ``<output.directory>/<output.name>-baseline/``: ``config.yaml``, ``c_search.csv``
(devel UAR per C), ``svm.joblib`` (the scaler + SVM whose test result is reported), ``metrics.json``,
``report.md``, ``plots/*.png``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.central import confusion_plots, load_partitions
from dsl_fed.config import Config
from dsl_fed.data.pipeline import ChunkSet
from dsl_fed.io import atomic_path, atomic_write, atomic_write_csv, refuse_existing, run_lock, staged_run
from dsl_fed.metrics import clip_metrics
from dsl_fed.predict import average_by_clip
from dsl_fed.report import render_report, write_metrics_json
from dsl_fed.train import class_weights

# Complexities searched on devel, one decade apart.
C_GRID: tuple[float, ...] = tuple(10.0**k for k in range(-6, 1))
MAX_ITER = 20_000


def run_baseline(cfg: Config, fuse_dev: bool = False, verbose: int = 1, command: str = "",
                 overwrite: bool = False) -> dict[str, Any]:
    """Embed train/devel/test, search C on devel, report devel and test; returns the content of ``metrics.json``.

    Everything is computed before the run folder (`baseline_dir`) is touched; it is then written like a central
    run (`dsl_fed.io.staged_run`: an earlier run of the name is replaced only with `overwrite`).

    Args:
        cfg: Validated config: ``data``, ``spectrogram``, ``model.backbone`` / ``model.weights`` (the embedder),
            ``training.class_balance`` (balanced SVM class weights), ``training.batch_size`` and ``training.seed``.
        fuse_dev: Also refit the selected C on train + devel and report test for that model, as in the paper.
        verbose: 0 silent, 1 progress bars, 2 one line per step; with 1 and 2 also one line per C.
        command: Command line recorded in ``report.md``.
        overwrite: Replace an earlier baseline run of the same name (else that is an error, raised first).
    """
    start = time.perf_counter()
    run_dir = baseline_dir(cfg)
    refuse_existing(run_dir, overwrite)
    manifest, train, devel, test = load_partitions(cfg, progress=verbose > 0)
    classes = manifest.classes
    embed = _embedder(cfg, verbose)
    x_train, x_devel = embed(train), embed(devel)
    x_test = embed(test) if test is not None else None

    seed = cfg.training.seed
    search = []
    for c in C_GRID:
        svm = fit_svm(x_train, train.labels, len(classes), c, cfg)
        scores = clip_metrics(*_clip_scores(svm, x_devel, devel), classes, seed=seed)
        search.append({"C": c, "devel_uar": scores["uar"], "converged": int(svm[-1].n_iter_ < MAX_ITER)})
        if verbose:
            print(f"C={c:g}: devel UAR {scores['uar']:.3f}", flush=True)
    best_c = max(search, key=lambda row: row["devel_uar"])["C"]  # first (smallest) C on ties

    svm = fit_svm(x_train, train.labels, len(classes), best_c, cfg)
    metrics: dict[str, Any] = {"run": cfg.output.name, "config_hash": cfg.hash(), "classes": classes}
    metrics["devel"] = clip_metrics(*_clip_scores(svm, x_devel, devel), classes, seed=seed)
    if x_test is not None:
        metrics["test"] = clip_metrics(*_clip_scores(svm, x_test, test), classes, seed=seed)
    if fuse_dev:
        fused = ChunkSet.concat([train, devel])
        svm = fit_svm(np.concatenate([x_train, x_devel]), fused.labels, len(classes), best_c, cfg)
        if x_test is not None:
            metrics["test_train_only"] = metrics.pop("test")
            metrics["test"] = clip_metrics(*_clip_scores(svm, x_test, test), classes, seed=seed)
    metrics["training"] = {
        "classifier": "StandardScaler + LinearSVC (DeepSpectrum baseline)",
        "embedding_dim": int(x_train.shape[1]),
        "train_chunks": len(train),
        "devel_chunks": len(devel),
        "c_grid": list(C_GRID),
        "best_c": best_c,
        "fused": bool(fuse_dev),
        "seconds": round(time.perf_counter() - start, 1),
        "warnings": manifest.warnings,
    }

    with run_lock(run_dir), staged_run(run_dir, overwrite) as folder:
        import joblib

        atomic_write(folder / "config.yaml", cfg.to_yaml())
        atomic_write_csv(folder / "c_search.csv", search)
        with atomic_path(folder / "svm.joblib") as tmp:
            joblib.dump(svm, tmp)
        write_metrics_json(folder / "metrics.json", metrics)
        plots = confusion_plots(folder, metrics)
        atomic_write(folder / "report.md", render_report(f"{cfg.output.name} (DeepSpectrum + SVM)", metrics, plots, command))
    return metrics


def baseline_dir(cfg: Config) -> Path:
    """``<output.directory>/<output.name>-baseline/``: beside a central run of the same config, never over it."""
    return cfg.output.run_dir.with_name(f"{cfg.output.name}-baseline")


def fit_svm(features: np.ndarray, labels: np.ndarray, num_classes: int, c: float, cfg: Config) -> Any:
    """``StandardScaler`` + ``LinearSVC(C=c)`` fitted on chunk embeddings, class-balanced like the network."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    weights = class_weights(labels, num_classes) if cfg.training.class_balance == "class_weight" else None
    svm = LinearSVC(C=c, class_weight=weights, max_iter=MAX_ITER, random_state=cfg.training.seed)
    with warnings.catch_warnings(action="ignore", category=ConvergenceWarning):  # c_search.csv records it
        return make_pipeline(StandardScaler(), svm).fit(features, labels)


def chunk_scores(svm: Any, features: np.ndarray) -> np.ndarray:
    """``(N, C)`` decision scores (one column per class, also for two classes, where sklearn gives one)."""
    scores = svm.decision_function(features)
    return np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores


def _clip_scores(svm: Any, features: np.ndarray, chunks: ChunkSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, clip_scores, clip_labels, clip_speakers = average_by_clip(chunk_scores(svm, features), chunks)
    return clip_labels, clip_scores, clip_speakers


def _embedder(cfg: Config, verbose: int) -> Callable[[ChunkSet], np.ndarray]:
    """``embed(chunks) -> (N, features)`` float32 with the config's front end and backbone."""
    from dsl_fed.models import build_embedder

    model = build_embedder(cfg)

    def embed(chunks: ChunkSet) -> np.ndarray:
        features = model.predict(chunks.waveforms, batch_size=cfg.training.batch_size, verbose=verbose)
        return np.asarray(features, dtype=np.float32)

    return embed


__all__: Sequence[str] = ["C_GRID", "baseline_dir", "run_baseline", "fit_svm", "chunk_scores"]
