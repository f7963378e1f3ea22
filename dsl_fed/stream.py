"""Streaming inference: microphone blocks in, one prediction per hop out (the paper's Figure 1 pipeline).

A device receives audio in blocks whose size has nothing to do with the model's window or hop. The
`RingBuffer` keeps the last `window` samples; `StreamPredictor` cuts the stream at exactly the positions
offline chunking uses (0, hop, 2·hop, ...), so an n-sample stream yields ⌊(n − window)/hop⌋ + 1 predictions
for n ≥ window. These are the chunks `dsl_fed predict` sees without `--stream`, except that offline chunking
also zero-pads a last partial window (a live stream cannot know that the speaker has stopped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from dsl_fed.errors import DslFedError

__all__ = ["RingBuffer", "StreamPrediction", "StreamPredictor", "expected_predictions", "reblock", "replay"]


class RingBuffer:
    """Fixed-capacity FIFO of float32 samples; writing never allocates, reading returns oldest → newest."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise DslFedError(f"ring buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._data = np.zeros(capacity, dtype=np.float32)
        self._end = 0  # index one past the newest sample
        self.total = 0  # samples ever written

    def __len__(self) -> int:
        return min(self.total, self.capacity)

    def write(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if len(samples) >= self.capacity:  # only the newest `capacity` samples can survive
            self.total += len(samples) - self.capacity
            samples = samples[-self.capacity :]
        first = min(len(samples), self.capacity - self._end)
        self._data[self._end : self._end + first] = samples[:first]
        self._data[: len(samples) - first] = samples[first:]
        self._end = (self._end + len(samples)) % self.capacity
        self.total += len(samples)

    def read(self) -> np.ndarray:
        """The buffered samples in arrival order (a copy), length `len(self)`."""
        if self.total < self.capacity:
            return self._data[: self._end].copy()
        return np.concatenate([self._data[self._end :], self._data[: self._end]])


@dataclass(frozen=True)
class StreamPrediction:
    """One prediction of the stream: which samples it saw and how long the model took."""

    index: int
    start: int  # first sample of the window, counted from the start of the stream
    end: int  # one past the last sample
    probabilities: np.ndarray
    latency_ms: float  # model time for this window
    padded: bool = False  # True for the one zero-padded window of a stream shorter than the window


def expected_predictions(num_samples: int, window: int, hop: int) -> int:
    """Predictions a stream of `num_samples` yields: ⌊(n − window)/hop⌋ + 1, or 1 (padded) if n < window."""
    if num_samples <= 0:
        return 0
    if num_samples < window:
        return 1
    return (num_samples - window) // hop + 1


class StreamPredictor:
    """Feed it audio blocks of any size; it predicts on every complete window, one per hop.

    Args:
        predict: Maps one window (window,) float32 to class probabilities (e.g. `TFLiteRunner.predict_one`).
        window: Window length in samples (the model's input length).
        hop: Samples between consecutive predictions.
        clock: Time source for latencies (injectable for tests).
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], window: int, hop: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if window < 1 or hop < 1:
            raise DslFedError(f"stream window and hop must be >= 1 sample, got window={window}, hop={hop}")
        self._predict = predict
        self.window = window
        self.hop = hop
        self._clock = clock
        self._buffer = RingBuffer(window)
        self._next_end = window  # stream position at which the next window is complete
        self._count = 0

    def push(self, block: np.ndarray) -> list[StreamPrediction]:
        """Append a block of samples; return the predictions whose windows it completed (possibly none)."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        out = []
        pos = 0
        while pos < len(block):
            # Write only up to the next window end, so the buffer holds exactly that window when we predict.
            take = min(len(block) - pos, self._next_end - self._buffer.total)
            self._buffer.write(block[pos : pos + take])
            pos += take
            if self._buffer.total == self._next_end:
                out.append(self._run(self._buffer.read(), padded=False))
                self._next_end += self.hop
        return out

    def finish(self) -> list[StreamPrediction]:
        """End of stream: a stream shorter than one window gets one zero-padded prediction (like offline
        chunking pads short clips); otherwise samples after the last full hop are dropped."""
        if self._count > 0 or self._buffer.total == 0:
            return []
        window = np.zeros(self.window, dtype=np.float32)
        seen = self._buffer.read()
        window[: len(seen)] = seen
        return [self._run(window, padded=True)]

    def _run(self, window: np.ndarray, padded: bool) -> StreamPrediction:
        t0 = self._clock()
        probs = np.asarray(self._predict(window), dtype=np.float32).reshape(-1)
        latency = (self._clock() - t0) * 1000.0
        end = self._buffer.total if not padded else self.window
        pred = StreamPrediction(self._count, end - self.window, end, probs, latency, padded)
        self._count += 1
        return pred


def replay(signal: np.ndarray | Iterable[np.ndarray], predictor: StreamPredictor, block: int, sample_rate: int,
           realtime: bool = False, sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.perf_counter) -> Iterator[StreamPrediction]:
    """Play `signal` into `predictor` in blocks of `block` samples, as a microphone would deliver it.

    `signal` is an array or its consecutive pieces of any sizes (e.g. a file decoded block by block). With
    `realtime`, each block is released only when it would have been recorded (block / sample_rate seconds
    apart), so a model slower than real time visibly falls behind.
    """
    if block < 1:
        raise DslFedError(f"stream block size must be >= 1 sample, got {block}")
    start = clock()
    pos = 0
    for chunk in reblock([signal] if isinstance(signal, np.ndarray) else signal, block):
        if realtime:
            due = start + (pos + len(chunk)) / sample_rate
            wait = due - clock()
            if wait > 0:
                sleep(wait)
        pos += len(chunk)
        yield from predictor.push(chunk)
    yield from predictor.finish()


def reblock(pieces: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The samples of `pieces` again, in blocks of exactly `size` (the last one shorter)."""
    pending = np.zeros(0, dtype=np.float32)
    for piece in pieces:
        pending = np.concatenate([pending, np.asarray(piece, dtype=np.float32).reshape(-1)])
        full = len(pending) - len(pending) % size
        for pos in range(0, full, size):
            yield pending[pos : pos + size]
        pending = pending[full:]
    if len(pending):
        yield pending

