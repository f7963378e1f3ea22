"""Clip-level evaluation: UAR, confusion matrix, bootstrap confidence intervals, per-speaker UAR and its spread.

UAR (unweighted average recall, the ComParE measure) is the mean recall over the classes that occur in
``y_true``. A class that is absent from the ground truth has no recall and is left out - otherwise every
speaker or bootstrap resample missing one class would be penalised for a class it cannot contain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dsl_fed.bootstrap import bootstrap_ci, ci_fields, confusion_table, outcome_table, table_ci
from dsl_fed.errors import DslFedError

__all__ = ["bootstrap_ci", "clip_metrics", "confusion", "confusion_metrics", "evaluate_chunks", "per_speaker_uar",
           "speaker_spread", "uar"]

if TYPE_CHECKING:
    import keras

    from dsl_fed.data.pipeline import ChunkSet


def uar(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Unweighted average recall over the classes present in `y_true` (in [0, 1])."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def confusion(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` int64 counts, rows = true class, columns = predicted class."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    if y_true.max() >= n or y_pred.max() >= n or min(y_true.min(), y_pred.min()) < 0:
        raise DslFedError(f"class indices must be in [0, {n}), got up to {max(y_true.max(), y_pred.max())}")
    return np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n).astype(np.int64)


def per_speaker_uar(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    speakers: Sequence[str] | np.ndarray,
) -> dict[str, float]:
    """UAR of each speaker's clips, ``{speaker: uar}`` sorted by speaker."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    speakers = np.asarray(speakers).astype(str)
    if speakers.shape != y_true.shape:
        raise DslFedError(f"speakers has {speakers.size} entries for {y_true.size} clips")
    return {str(s): uar(y_true[speakers == s], y_pred[speakers == s]) for s in sorted(set(speakers.tolist()))}


def speaker_spread(per_speaker: Mapping[str, float]) -> dict[str, Any]:
    """How evenly a model serves its speakers: the spread of the per-speaker UAR.

    A good mean can hide speakers the model fails; federated training in particular can favour the shards
    it saw most. ``std`` is the population standard deviation (ddof 0); ``worst_10pct`` is the mean UAR of
    the ceil(10 %) lowest-scoring speakers (at least one; ties broken by speaker name), listed in
    ``worst_speakers``.

    Returns:
        ``{"speakers", "min", "median", "max", "std", "worst_10pct", "worst_speakers"}``.
    """
    if not per_speaker:
        raise DslFedError("speaker spread needs at least one speaker")
    ranked = sorted(per_speaker.items(), key=lambda item: (item[1], item[0]))
    values = np.array([v for _, v in ranked], dtype=np.float64)
    worst = ranked[: max(1, math.ceil(0.1 * len(ranked)))]
    return {
        "speakers": len(ranked),
        "min": float(values.min()),
        "median": float(np.median(values)),
        "max": float(values.max()),
        "std": float(values.std()),
        "worst_10pct": float(np.mean([v for _, v in worst])),
        "worst_speakers": [s for s, _ in worst],
    }


def clip_metrics(
    clip_labels: np.ndarray,
    clip_probs: np.ndarray,
    clip_speakers: np.ndarray,
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All reported numbers for clip-level predictions, as JSON-ready Python types.

    The primary interval is the two-stage speaker-level bootstrap (`dsl_fed.bootstrap`); the clip-level one is
    ``ci_clips``.

    Returns:
        ``{"uar", "ci": [low, high], "ci_level", "ci_groups", "ci_clips": [low, high], ["ci_note"], "accuracy",
        "confusion": [[...]], "per_speaker": {spk: uar}, "speaker_spread": `speaker_spread`, "num_clips",
        "classes"}``.
    """
    y_pred = np.argmax(clip_probs, axis=1)
    clip_labels, y_pred = _check_pair(clip_labels, y_pred)
    speakers = per_speaker_uar(clip_labels, y_pred, clip_speakers)
    return {
        "uar": uar(clip_labels, y_pred),
        **ci_fields(outcome_table(clip_labels, y_pred, clip_speakers), "speakers", n=n_boot, seed=seed),
        "accuracy": float(np.mean(y_pred == clip_labels)),
        "confusion": confusion(clip_labels, y_pred, len(classes)).tolist(),
        "per_speaker": speakers,
        "speaker_spread": speaker_spread(speakers),
        "num_clips": int(len(clip_labels)),
        "classes": list(classes),
    }


def confusion_metrics(counts: np.ndarray, classes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """`clip_metrics` from confusion counts (federated evaluation: nodes send counts, never clips).

    Args:
        counts: ``(nodes, K, K)`` counts, one matrix per node; their sum holds every (true, predicted) pair, so
            UAR and accuracy are exactly what scoring all those clips in one place gives. The primary interval
            resamples nodes, then clips within each (``ci_level`` ``nodes``): per-speaker counts stay on the
            nodes. A single ``(K, K)`` matrix (nodes unknown) gives the clip-level interval only.
        classes: Class names (``K``).
        n_boot: Bootstrap resamples.
        seed: Seed of the resampling.
    """
    k = len(classes)
    counts = np.asarray(counts, dtype=np.int64)
    per_node = counts.ndim == 3
    counts = counts.reshape(-1, k, k)
    if counts.min(initial=0) < 0:
        raise DslFedError("confusion counts must be >= 0")
    total = counts.sum(axis=0)
    if total.sum() == 0:
        raise DslFedError("cannot score zero clips")
    recall = np.diag(total)[total.sum(axis=1) > 0] / total.sum(axis=1)[total.sum(axis=1) > 0]
    table = confusion_table(counts)
    if per_node:
        intervals = ci_fields(table, "nodes", n=n_boot, seed=seed)
    else:
        clips = list(table_ci(table, n_boot, seed, two_stage=False))
        intervals = {"ci": clips, "ci_level": "clips", "ci_clips": clips}
    return {
        "uar": float(np.mean(recall)),
        **intervals,
        "accuracy": float(np.trace(total) / total.sum()),
        "confusion": total.tolist(),
        "num_clips": int(total.sum()),
        "classes": list(classes),
    }


def evaluate_chunks(
    model: "keras.Model",
    chunks: "ChunkSet",
    classes: Sequence[str],
    batch_size: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Predict every chunk, average chunk probabilities per clip, and score the clips (`clip_metrics`).

    The result also holds ``"num_chunks"``.
    """
    from dsl_fed.predict import predict_clips

    _, probs, labels, speakers = predict_clips(model, chunks, batch_size=batch_size)
    result = clip_metrics(labels, probs, speakers, classes, n_boot=n_boot, seed=seed)
    result["num_chunks"] = len(chunks)
    return result


def _check_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    y_pred = np.asarray(y_pred).astype(np.int64).reshape(-1)
    if y_true.size == 0:
        raise DslFedError("cannot score zero clips")
    if y_true.shape != y_pred.shape:
        raise DslFedError(f"y_true has {y_true.size} entries but y_pred has {y_pred.size}")
    return y_true, y_pred
