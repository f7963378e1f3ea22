"""Cut a clip into fixed-length, overlapping windows and peak-normalise each window.

Unlike the original DeepSpectrumLite, nothing is dropped: the last partial window and clips shorter than one
window are zero-padded, so every sample of every clip reaches the model and every clip yields >= 1 chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from dsl_fed.errors import DslFedError


def count_chunks(num_samples: int, chunk_samples: int, hop_samples: int) -> int:
    """Number of windows `chunk_signal` returns for a clip of `num_samples` samples.

    A new window is started at every multiple of `hop_samples` while the previous window has not reached the
    end of the clip and the new one still starts inside it. Hence: one window while ``num_samples <=
    chunk_samples``; otherwise ``1 + ceil((num_samples - chunk_samples) / hop_samples)`` for ``hop <= chunk``
    and ``ceil(num_samples / hop_samples)`` for ``hop > chunk`` (gaps between windows are skipped).
    """
    _check_sizes(chunk_samples, hop_samples)
    if num_samples <= chunk_samples:
        return 1
    starts_inside = math.ceil(num_samples / hop_samples) - 1  # k >= 1 with k * hop < n
    previous_short = math.ceil((num_samples - chunk_samples) / hop_samples)  # k >= 1 with (k-1)*hop + chunk < n
    return 1 + min(starts_inside, previous_short)


def chunk_signal(x: np.ndarray, chunk_samples: int, hop_samples: int) -> np.ndarray:
    """Slide a window of `chunk_samples` with step `hop_samples` over a 1-D signal.

    Args:
        x: 1-D signal.
        chunk_samples: Window length in samples (>= 1).
        hop_samples: Step between window starts in samples (>= 1).

    Returns:
        float32 array ``(count_chunks(len(x), ...), chunk_samples)``; the tail is zero-padded.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise DslFedError(f"chunk_signal: expected a 1-D signal, got shape {x.shape}")
    n = count_chunks(x.shape[0], chunk_samples, hop_samples)
    padded = np.zeros((n - 1) * hop_samples + chunk_samples, dtype=np.float32)
    used = min(x.shape[0], padded.shape[0])
    padded[:used] = x[:used]
    windows = np.lib.stride_tricks.sliding_window_view(padded, chunk_samples)[::hop_samples]
    return np.ascontiguousarray(windows[:n])


def iter_chunks(blocks: Iterable[np.ndarray], chunk_samples: int, hop_samples: int) -> Iterator[np.ndarray]:
    """`chunk_signal` of the concatenated `blocks`, window by window, holding at most one window and one block.

    A window is yielded as soon as its samples have arrived; when the blocks end, the windows `count_chunks`
    adds for the tail are yielded zero-padded, exactly as `chunk_signal` pads them.
    """
    _check_sizes(chunk_samples, hop_samples)
    buffer = np.zeros(0, dtype=np.float32)
    offset = 0  # stream position of buffer[0]
    k = 0  # next window; it starts at k * hop
    total = 0
    for block in blocks:
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        total += len(block)
        buffer = np.concatenate([buffer, block])
        while k * hop_samples + chunk_samples <= offset + len(buffer):
            start = k * hop_samples - offset
            yield buffer[start : start + chunk_samples].copy()
            k += 1
        drop = min(k * hop_samples - offset, len(buffer))  # samples no later window needs
        buffer, offset = buffer[drop:], offset + drop
    for k in range(k, count_chunks(total, chunk_samples, hop_samples)):
        window = np.zeros(chunk_samples, dtype=np.float32)
        start = k * hop_samples - offset
        tail = buffer[max(start, 0) : start + chunk_samples]
        window[: len(tail)] = tail
        yield window


def normalise_chunks(chunks: np.ndarray) -> np.ndarray:
    """Per-chunk peak normalisation ``x / max(|x|)`` over the last axis (the paper's signal normalisation).

    A silent chunk stays all zeros (no division by zero, no warning). Division (not multiplication by the
    reciprocal) makes the peak exactly 1.0, so applying it twice changes nothing: the in-graph
    `SpectrogramImage` layer repeats it so that devices can feed raw audio.

    Args:
        chunks: ``(..., chunk_samples)`` array; a single 1-D chunk works too.

    Returns:
        float32 array of the same shape with every non-silent chunk's peak at 1.0.
    """
    chunks = np.asarray(chunks, dtype=np.float32)
    peak = np.max(np.abs(chunks), axis=-1, keepdims=True) if chunks.size else np.zeros(chunks.shape[:-1] + (1,))
    out = np.zeros_like(chunks)
    np.divide(chunks, peak, out=out, where=peak > 0)
    return out


def _check_sizes(chunk_samples: int, hop_samples: int) -> None:
    if int(chunk_samples) != chunk_samples or chunk_samples < 1:
        raise DslFedError(f"chunk length must be a positive number of samples, got {chunk_samples}")
    if int(hop_samples) != hop_samples or hop_samples < 1:
        raise DslFedError(f"chunk hop must be a positive number of samples, got {hop_samples}")
