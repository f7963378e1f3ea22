"""Attribute inference from client updates: does a client's slice update give away its speaker's voice?

The probe is a plain classifier (L2 logistic regression, its strength chosen by an inner cross-validation)
cross-validated over clients: each client's flattened update is one example, its speaker's attribute (e.g.
pitch group) the label. Its accuracy is compared with chance, the share of the most common attribute value
(always guessing it). The features are not standardised one by one: that would blow the many near-constant
weights of an update up to the size of the few that carry the attribute (with far more weights than clients,
the probe then fits noise); the updates are only divided by their overall RMS, so one grid of strengths fits
any update size.

What each row of the audit feeds it:

* the raw update - what the server sees without DP, or in ``federated.dp.mode: server``;
* the update clipped to the clipping norm C - what the server sees in ``mode: client``;
* the clipped update plus N(0, (z·C)²) per coordinate - what one published round tells an adversary who knows
  every other client's update: the round publishes ``(Σ clipped + N(0, (z·C)²)) / m``, and subtracting the
  others' updates leaves this client's clipped update under the full noise. This is the adversary DP is
  stated against; anyone else knows less.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import beta
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits


def clip_rows(updates: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each row scaled down to L2 norm `clip_norm` if above it (the DP clipping of one update)."""
    updates = np.asarray(updates, dtype=np.float64)
    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    return updates * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-300))


def add_noise(updates: np.ndarray, stddev: float, rng: np.random.Generator) -> np.ndarray:
    """`updates` plus independent N(0, stddev²) per coordinate."""
    updates = np.asarray(updates, dtype=np.float64)
    return updates + rng.normal(0.0, stddev, updates.shape)


def chance(labels: Sequence) -> float:
    """Accuracy of always guessing the most common label."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())


def probe_accuracy(updates: np.ndarray, labels: Sequence, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of logistic regression predicting `labels` from `updates` (one row per client).

    Stratified folds (at most the smallest class's count); every client is predicted once by a model that
    never saw it, whose regularisation was chosen (3-fold) on that model's training clients only.
    """
    labels = np.asarray(labels)
    _, counts = np.unique(labels, return_counts=True)
    k = int(min(folds, counts.min()))
    if k < 2:
        raise ValueError(f"every attribute value needs >= 2 clients for cross-validation, got counts {counts.tolist()}")
    x = np.asarray(updates, dtype=np.float64)
    x = x / max(float(np.sqrt(np.mean(x * x))), 1e-300)
    inner = StratifiedKFold(min(3, k - 1 if k > 2 else 2), shuffle=True, random_state=seed)
    model = GridSearchCV(LogisticRegression(max_iter=1000), {"C": np.logspace(-2, 2, 5).tolist()}, cv=inner)
    with threadpool_limits(1):  # many small fits: BLAS threads only fight each other (and other jobs) for cores
        predicted = cross_val_predict(model, x, labels, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    return float(np.mean(predicted == labels))


def accuracy_ci(accuracy: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Clopper-Pearson interval of an accuracy over `n` clients (each predicted once)."""
    right = round(accuracy * n)
    low = 0.0 if right == 0 else float(beta.ppf(alpha / 2, right, n - right + 1))
    high = 1.0 if right == n else float(beta.ppf(1 - alpha / 2, right + 1, n - right))
    return low, high
