"""Chunk predictions averaged into clip predictions (the paper scores clips, the model sees chunks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

    from dsl_fed.data.pipeline import ChunkSet


def predict_clips(
    model: "keras.Model", chunks: "ChunkSet", batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Predict all chunks and average the class probabilities of each clip's chunks.

    Args:
        model: Waveform model, input ``(B, chunk_samples)``, output ``(B, C)`` probabilities.
        chunks: Chunks with their clip ids, labels and speakers.
        batch_size: Prediction batch size.

    Returns:
        ``(clip_ids, clip_probs, clip_labels, clip_speakers)`` sorted by clip id; ``clip_probs`` is ``(n, C)``.
    """
    return average_by_clip(predict_batches(model, chunks.waveforms, batch_size), chunks)


def predict_batches(model: "keras.Model", x: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.predict(x)`` in batches of exactly `batch_size`: a short last batch is padded, the padding dropped.

    One batch shape means one traced predict step however many chunks come (a client process predicts shards
    of every size), and the same computation whether or not the model predicted other sizes before. The padding
    repeats the last chunk, so it never feeds the model an input it would not see anyway.
    """
    full = len(x) - len(x) % batch_size
    parts = [model.predict(x[:full], batch_size=batch_size, verbose=0)] if full else []
    if full < len(x):
        tail = np.concatenate([x[full:], np.repeat(x[-1:], batch_size - (len(x) - full), axis=0)])
        parts.append(model.predict(tail, batch_size=batch_size, verbose=0)[: len(x) - full])
    if not parts:
        return model.predict(x, batch_size=batch_size, verbose=0)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def average_by_clip(probs: np.ndarray, chunks: "ChunkSet") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean of chunk probabilities per clip; see `predict_clips` for the returned tuple."""
    probs = np.asarray(probs, dtype=np.float64)
    clip_ids, first, inverse = np.unique(chunks.clip_ids, return_index=True, return_inverse=True)
    sums = np.zeros((clip_ids.size, probs.shape[1]))
    np.add.at(sums, inverse, probs)
    counts = np.bincount(inverse, minlength=clip_ids.size)[:, None]
    return clip_ids, (sums / counts).astype(np.float32), chunks.labels[first], chunks.speakers[first]
