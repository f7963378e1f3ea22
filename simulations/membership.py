"""Speaker-level membership inference: attack scores, ROC metrics, threshold calibration and the DP bound.

An attacker holds a speaker's labelled clips and the published model and asks "was this speaker a client?".
Its score is the model's mean log-likelihood of the true labels on the speaker's clips (members were fitted,
so their loss is lower). Everything here works on per-speaker scores, so it is tested on synthetic ones.

The bound: a mechanism is (ε, δ)-DP exactly when every test of "speaker in" against "speaker out" on its output
has false-positive rate α and true-positive rate β with ``β <= e^ε·α + δ`` and ``1 - α <= e^ε·(1 - β) + δ``
(Wasserman & Zhou, JASA 2010, Thm 2.4; Kairouz, Oh & Viswanath, ICML 2015, Thm 2.1), i.e.

    TPR <= min(1, e^ε·FPR + δ, 1 - e^-ε·(1 - δ - FPR)).

Both constraints are linear in (FPR, TPR), so they also bound an attack's average over speakers. Composed
Gaussian mechanisms have a tighter curve: R releases of noise multiplier z are μ-GDP with μ = sqrt(R)/z and
``TPR <= Φ(Φ⁻¹(FPR) + μ)`` (Dong, Roth & Su, JRSS-B 2022, Cor. 3.3), reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_curve


def speaker_scores(log_likelihoods: Sequence[float], speakers: Sequence[str]) -> dict[str, float]:
    """Attack score per speaker: the mean log-likelihood of the true label over the speaker's clips."""
    values = np.asarray(log_likelihoods, dtype=np.float64)
    names = np.asarray(speakers).astype(str)
    return {s: float(values[names == s].mean()) for s in np.unique(names)}


def roc(members: Sequence[float], nonmembers: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of "member if score >= t" over all thresholds t, from (0, 0) to (1, 1)."""
    y, s = _labelled(members, nonmembers)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """Area under the ROC: the chance that a random member outscores a random non-member (ties count half).

    The Mann-Whitney statistic from ranks (fast enough for thousands of bootstrap resamples).
    """
    y, s = _labelled(members, nonmembers)
    ins = int(y.sum())
    return float((rankdata(s)[y == 1].sum() - ins * (ins + 1) / 2) / (ins * (len(y) - ins)))


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], at: float) -> float:
    """The highest TPR of any threshold whose FPR is at most `at` (0 false positives when `at` < 1/non-members).

    With the non-members sorted from the highest score, a threshold may admit the first k = floor(at·n) of
    them: the best one lies just above the (k+1)-th, and finds every member scoring above it.
    """
    _labelled(members, nonmembers)
    outs = np.sort(np.asarray(nonmembers, dtype=np.float64))[::-1]
    allowed = int(np.floor(at * len(outs) + 1e-9))
    return 1.0 if allowed >= len(outs) else float(np.mean(np.asarray(members, dtype=np.float64) > outs[allowed]))


def calibrated_threshold(nonmembers: Sequence[float], at: float) -> float:
    """The lowest threshold whose FPR on these (shadow) non-members is at most `at`: the attack calibrated there.

    Scores >= the threshold are called members; with fewer than 1/`at` non-members it admits no false positive
    (the threshold lies just above the highest non-member).
    """
    out = np.sort(np.asarray(nonmembers, dtype=np.float64))[::-1]
    allowed = int(np.floor(at * len(out) + 1e-9))  # false positives the rate allows
    return float(np.nextafter(out[allowed], np.inf)) if allowed < len(out) else -np.inf


def rates(members: Sequence[float], nonmembers: Sequence[float], threshold: float) -> tuple[float, float]:
    """``(fpr, tpr)`` of "member if score >= threshold"."""
    return (float(np.mean(np.asarray(nonmembers) >= threshold)), float(np.mean(np.asarray(members) >= threshold)))


def dp_tpr_bound(fpr: float | np.ndarray, epsilon: float | None, delta: float) -> float | np.ndarray:
    """The most TPR an (ε, δ)-DP mechanism allows at `fpr` (module docstring); 1 without a guarantee."""
    fpr = np.asarray(fpr, dtype=np.float64)
    if epsilon is None or not np.isfinite(epsilon):
        return np.ones_like(fpr) if fpr.ndim else 1.0
    bound = np.minimum.reduce([np.ones_like(fpr), np.exp(epsilon) * fpr + delta,
                               1 - np.exp(-epsilon) * (1 - delta - fpr)])
    bound = np.maximum(bound, fpr)  # guessing at random reaches TPR = FPR under any mechanism
    return bound if bound.ndim else float(bound)


def gdp_tpr_bound(fpr: float | np.ndarray, mu: float | None) -> float | np.ndarray:
    """The most TPR a μ-GDP mechanism allows at `fpr`: Φ(Φ⁻¹(FPR) + μ); 1 without a guarantee."""
    fpr = np.asarray(fpr, dtype=np.float64)
    if mu is None or not np.isfinite(mu):
        return np.ones_like(fpr) if fpr.ndim else 1.0
    bound = norm.cdf(norm.ppf(fpr) + mu)
    return bound if bound.ndim else float(bound)


def gaussian_mu(noise_multiplier: float, releases: int) -> float | None:
    """μ of `releases` composed Gaussian releases of multiplier z (sensitivity one clipping norm): sqrt(R)/z."""
    return None if noise_multiplier <= 0 else float(np.sqrt(releases) / noise_multiplier)


def auc_bound(tpr_bound: Callable[[np.ndarray], np.ndarray]) -> float:
    """The AUC that a TPR bound allows: the area under it (trapezoid rule on a fine grid, log-spaced near 0)."""
    grid = np.unique(np.concatenate([[0.0], np.logspace(-9, 0, 4000), np.linspace(0, 1, 4001)]))
    values = np.asarray(tpr_bound(grid), dtype=np.float64)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)))


def bootstrap(members: Sequence[float], nonmembers: Sequence[float],
              statistic: Callable[[np.ndarray, np.ndarray], float], n: int = 1000, seed: int = 0,
              alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of `statistic` resampling members and non-members (speakers) with replacement."""
    rng = np.random.default_rng(seed)
    ins, outs = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    values = [statistic(rng.choice(ins, ins.size), rng.choice(outs, outs.size)) for _ in range(n)]
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def split(scores: Mapping[str, float], members: Sequence[str], nonmembers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Scores of `members` and `nonmembers` (speaker names) as two arrays."""
    return (np.array([scores[s] for s in members], dtype=np.float64),
            np.array([scores[s] for s in nonmembers], dtype=np.float64))


def _labelled(members: Sequence[float], nonmembers: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    ins, outs = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    if not ins.size or not outs.size:
        raise ValueError(f"need members and non-members, got {ins.size} and {outs.size}")
    return np.concatenate([np.ones(ins.size), np.zeros(outs.size)]), np.concatenate([ins, outs])
