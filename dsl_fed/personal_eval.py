"""Personalisation as an evaluation: every held-out speaker fine-tunes the head on K of their clips.

For each speaker of a devel or test partition: K of their clips are picked (`pick_clips`: per seed and speaker,
stratified by class), the head starts from the model's weights with a fresh optimizer, trains on those K clips
(`dsl_fed.personalize.fine_tune`, LiteRT only) and scores the speaker's other clips. The same clips scored by the
unpersonalised head give "before", so each speaker's change is measured on identical clips. A speaker with at
most K clips has nothing left to score and is left out (and named).

Summary: per-speaker UAR before and after, their means over speakers, the mean of the worst 10 % of speakers
(`dsl_fed.metrics.speaker_spread`: the ceil(10 %) lowest, at least one), and the UAR of all scored clips pooled.
Intervals are the project's two-stage speaker bootstrap (`dsl_fed.bootstrap`): for the pooled UAR exactly
`ci_fields`; for a mean over speakers the same two stages (speakers with replacement, then each drawn speaker's
scored clips) with the mean of the resampled speakers' UARs as the statistic, and for the gain the same draws
for before and after (paired).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from dsl_fed.errors import DslFedError

__all__ = ["SpeakerResult", "pick_clips", "personalize_speakers", "summarize", "mean_uar_ci", "render"]

N_BOOT = 1000
TITLE = "### Personalisation on the device: "  # how a results file starts (and is recognised)


@dataclass(frozen=True)
class SpeakerResult:
    """One speaker: how many clips tuned and scored, the scored clips' labels and predictions before/after."""

    speaker: str
    tuned: int
    labels: np.ndarray
    before: np.ndarray
    after: np.ndarray

    @property
    def uar_before(self) -> float:
        from dsl_fed.metrics import uar

        return uar(self.labels, self.before)

    @property
    def uar_after(self) -> float:
        from dsl_fed.metrics import uar

        return uar(self.labels, self.after)


def _speaker_seed(seed: int, speaker: str) -> list[int]:
    return [seed, zlib.crc32(speaker.encode())]


def pick_clips(clips: Sequence[Any], k: int, seed: int) -> tuple[list[Any], list[Any]]:
    """``(K clips to fine-tune on, the rest)`` of one speaker's clips, the same for the same seed and speaker.

    Stratified by class where possible: classes take turns (in an order drawn from the seed), each giving its
    next clip (its clips in a drawn order), until K are picked; a class without clips left is skipped.
    """
    clips = sorted(clips, key=lambda c: c.clip_id)
    if not clips:
        return [], []
    rng = np.random.default_rng(_speaker_seed(seed, clips[0].speaker))
    by_class: dict[str, list[Any]] = {}
    for clip in clips:
        by_class.setdefault(clip.label, []).append(clip)
    queues = {label: [group[i] for i in rng.permutation(len(group))] for label, group in sorted(by_class.items())}
    order = [sorted(queues)[i] for i in rng.permutation(len(queues))]
    chosen: list[Any] = []
    while len(chosen) < min(k, len(clips)):
        for label in order:
            if queues[label] and len(chosen) < k:
                chosen.append(queues[label].pop(0))
    picked = {c.clip_id for c in chosen}
    return chosen, [c for c in clips if c.clip_id not in picked]


def personalize_speakers(trainable_path: Any, clips: Sequence[Any], chunks: Any, *, k: int, epochs: int,
                         batch_size: int, seed: int, class_balance: str, threads: int | None = None
                         ) -> tuple[list[SpeakerResult], list[str]]:
    """Fine-tune on K clips and score the rest, per speaker of `clips` (the chunks of all of them in `chunks`).

    Every chunk is embedded once. Each speaker gets a runner of its own seeded by (seed, speaker), so a
    speaker's result does not depend on which other speakers ran.

    Returns:
        ``(results sorted by speaker, speakers left out because they have at most K clips)``.
    """
    from dsl_fed.federated.litert_runtime import DROPOUT_STREAM
    from dsl_fed.litert_training import TrainableRunner
    from dsl_fed.personalize import embed_chunks, fine_tune

    base = TrainableRunner(trainable_path, threads=threads)
    original = base.parameters()
    x = embed_chunks(base, chunks.waveforms, batch_size)
    before_probs = np.concatenate([base.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    by_speaker: dict[str, list[Any]] = {}
    for clip in clips:
        by_speaker.setdefault(clip.speaker, []).append(clip)
    results, skipped = [], []
    for speaker in sorted(by_speaker):
        tune, score = pick_clips(by_speaker[speaker], k, seed)
        if not score:
            skipped.append(speaker)
            continue
        tuned = np.isin(chunks.clip_ids, [c.clip_id for c in tune])
        scored = np.isin(chunks.clip_ids, [c.clip_id for c in score])
        runner = TrainableRunner(trainable_path, threads=threads,
                                 seed=(*_speaker_seed(seed, speaker), DROPOUT_STREAM))
        runner.restore(original)
        fine_tune(runner, x[tuned], chunks.labels[tuned], batch_size=batch_size, epochs=epochs, seed=seed,
                  class_balance=class_balance)
        after_probs = np.concatenate([runner.infer(x[scored][i:i + batch_size])
                                      for i in range(0, int(scored.sum()), batch_size)])
        labels, before = _by_clip(before_probs[scored], chunks, scored)
        _, after = _by_clip(after_probs, chunks, scored)
        results.append(SpeakerResult(speaker, len(tune), labels, before, after))
    return results, skipped


def _by_clip(probs: np.ndarray, chunks: Any, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clip labels, clip predictions) of the chunks under `mask`: chunk probabilities averaged per clip."""
    from dsl_fed.predict import average_by_clip

    part = SimpleNamespace(clip_ids=chunks.clip_ids[mask], labels=chunks.labels[mask], speakers=chunks.speakers[mask])
    _, clip_probs, labels, _ = average_by_clip(probs, part)
    return labels.astype(np.int64), clip_probs.argmax(axis=1)


def mean_uar_ci(results: Sequence[SpeakerResult], n: int = N_BOOT, seed: int = 0,
                alpha: float = 0.05) -> dict[str, list[float]]:
    """Two-stage bootstrap intervals of the mean per-speaker UAR before, after, and of the mean gain (paired).

    Returns:
        ``{"before": [low, high], "after": [low, high], "gain": [low, high]}``.
    """
    from dsl_fed.metrics import uar

    if not results:
        raise DslFedError("no speaker to score")
    rng = np.random.default_rng(seed)
    stats = np.empty((n, 2))
    for b in range(n):
        sums = np.zeros(2)
        for s in rng.integers(0, len(results), len(results)):
            r = results[s]
            idx = rng.integers(0, len(r.labels), len(r.labels))
            sums += (uar(r.labels[idx], r.before[idx]), uar(r.labels[idx], r.after[idx]))
        stats[b] = sums / len(results)
    q = [alpha / 2, 1 - alpha / 2]
    return {"before": np.quantile(stats[:, 0], q).tolist(), "after": np.quantile(stats[:, 1], q).tolist(),
            "gain": np.quantile(stats[:, 1] - stats[:, 0], q).tolist()}


def summarize(results: Sequence[SpeakerResult], classes: Sequence[str], n_boot: int = N_BOOT,
              seed: int = 0) -> dict[str, Any]:
    """Per-speaker UARs, their means with intervals, the worst decile before and after, the pooled UAR."""
    from dsl_fed.bootstrap import ci_fields, outcome_table
    from dsl_fed.metrics import speaker_spread, uar

    if not results:
        raise DslFedError("no speaker has more clips than K: nothing to score (lower --personalize)")
    before = {r.speaker: r.uar_before for r in results}
    after = {r.speaker: r.uar_after for r in results}
    labels = np.concatenate([r.labels for r in results])
    speakers = np.concatenate([[r.speaker] * len(r.labels) for r in results])
    pooled = {}
    for when in ("before", "after"):
        pred = np.concatenate([getattr(r, when) for r in results])
        pooled[when] = {"uar": uar(labels, pred), **ci_fields(outcome_table(labels, pred, speakers), "speakers",
                                                              n=n_boot, seed=seed)}
    return {
        "per_speaker": {r.speaker: {"tuned": r.tuned, "scored": int(len(r.labels)), "before": before[r.speaker],
                                    "after": after[r.speaker]} for r in results},
        "mean": {"before": float(np.mean(list(before.values()))), "after": float(np.mean(list(after.values()))),
                 "gain": float(np.mean([after[s] - before[s] for s in before]))},
        "mean_ci": mean_uar_ci(results, n_boot, seed),
        "worst": {"before": speaker_spread(before), "after": speaker_spread(after)},
        "worst_count": max(1, math.ceil(0.1 * len(results))),
        "pooled": pooled,
        "speakers": len(results),
        "scored_clips": int(len(labels)),
        "classes": list(classes),
    }


def render(summary: dict[str, Any], setup: dict[str, Any]) -> str:
    """The markdown results file: a setup line, one row per speaker, the mean, worst decile and pooled rows."""
    from dsl_fed.bootstrap import ci_text

    classes = summary["classes"]
    lines = [f"{TITLE}{setup['model']}, {setup['partition']}, K = {setup['k']}", "",
             f"Corpus {setup['corpus']}: {summary['speakers']} speakers scored"
             + (f" ({len(setup['skipped'])} with at most K clips left out: {', '.join(setup['skipped'])})"
                if setup["skipped"] else "")
             + f", {len(classes)} classes ({', '.join(classes)}; chance UAR {1 / len(classes):.3f}), "
             f"{summary['scored_clips']} scored clips. Each speaker fine-tunes the head on K = {setup['k']} of "
             f"their clips (stratified by class, seed {setup['seed']}) for {setup['epochs']} epochs of batch "
             f"{setup['batch_size']} with LiteRT, then scores their other clips; before = the same clips with the "
             "model's own head.", "",
             "| speaker | tuned clips | scored clips | UAR before | UAR after | change |", "|---|---:|---:|---:|---:|---:|"]
    for speaker, row in summary["per_speaker"].items():
        lines.append(f"| {speaker} | {row['tuned']} | {row['scored']} | {row['before']:.3f} | {row['after']:.3f} | "
                     f"{row['after'] - row['before']:+.3f} |")
    mean, ci = summary["mean"], summary["mean_ci"]
    worst = summary["worst"]
    lines.append(f"| **mean over speakers** | | | {mean['before']:.3f} [{ci['before'][0]:.3f}, {ci['before'][1]:.3f}] | "
                 f"{mean['after']:.3f} [{ci['after'][0]:.3f}, {ci['after'][1]:.3f}] | "
                 f"{mean['gain']:+.3f} [{ci['gain'][0]:+.3f}, {ci['gain'][1]:+.3f}] |")
    lines.append(f"| **worst 10 % ({summary['worst_count']} speaker(s))** | | | {worst['before']['worst_10pct']:.3f} "
                 f"({', '.join(worst['before']['worst_speakers'])}) | {worst['after']['worst_10pct']:.3f} "
                 f"({', '.join(worst['after']['worst_speakers'])}) | "
                 f"{worst['after']['worst_10pct'] - worst['before']['worst_10pct']:+.3f} |")
    pooled = summary["pooled"]
    lines += ["", f"All scored clips pooled: UAR before {pooled['before']['uar']:.3f}, {ci_text(pooled['before'])}; "
              f"after {pooled['after']['uar']:.3f}, {ci_text(pooled['after'])}.", "",
              "Intervals: 95 %, 1000x two-stage bootstrap (speakers with replacement, then each drawn speaker's "
              "scored clips); for the means the statistic is the mean of the drawn speakers' UARs, the change "
              "interval uses the same draws before and after. Worst 10 %: mean UAR of the ceil(10 %) "
              "lowest-scoring speakers, chosen separately before and after.", ""]
    return "\n".join(lines)
