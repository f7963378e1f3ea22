"""Clips -> normalised chunks in memory -> tf.data batches for Keras.

Each file is decoded, resampled and chunked exactly once into a `ChunkSet`; epochs, shuffles and federated
rounds reuse the arrays. The corpora this project targets fit in memory (1 h of 16 kHz audio = 230 MB float32
with 50 % hop), which keeps decoding out of the training loop and makes results independent of I/O order.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from dsl_fed.config import DataConfig
from dsl_fed.data.audio import load_audio
from dsl_fed.data.chunking import chunk_signal, normalise_chunks
from dsl_fed.data.manifest import Clip
from dsl_fed.errors import DslFedError

if TYPE_CHECKING:
    import tensorflow as tf


@dataclass
class ChunkSet:
    """Fixed-length, peak-normalised waveform chunks with the clip each came from.

    Attributes:
        waveforms: ``(N, chunk_samples)`` float32.
        labels: ``(N,)`` int32 class indices.
        clip_ids: ``(N,)`` int32 `Clip.clip_id` of each chunk (clip-level scores average over these).
        speakers: ``(N,)`` str speaker of each chunk.
    """

    waveforms: np.ndarray
    labels: np.ndarray
    clip_ids: np.ndarray
    speakers: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.waveforms)
        if self.waveforms.ndim != 2 or not (len(self.labels) == len(self.clip_ids) == len(self.speakers) == n):
            raise DslFedError(
                f"ChunkSet: inconsistent shapes waveforms={self.waveforms.shape}, labels={self.labels.shape}, "
                f"clip_ids={self.clip_ids.shape}, speakers={self.speakers.shape}"
            )

    def __len__(self) -> int:
        return int(self.waveforms.shape[0])

    @property
    def chunk_samples(self) -> int:
        return int(self.waveforms.shape[1])

    @staticmethod
    def concat(sets: Sequence["ChunkSet"]) -> "ChunkSet":
        """Join chunk sets (e.g. train + devel for the final model, as in the paper)."""
        if not sets:
            raise DslFedError("ChunkSet.concat: nothing to join")
        return ChunkSet(
            np.concatenate([s.waveforms for s in sets]),
            np.concatenate([s.labels for s in sets]),
            np.concatenate([s.clip_ids for s in sets]),
            np.concatenate([s.speakers for s in sets]),
        )


def load_chunks(clips: Iterable[Clip], data_cfg: DataConfig, classes: Sequence[str], progress: bool = True) -> ChunkSet:
    """Decode each clip once, cut it into chunks and peak-normalise every chunk.

    Args:
        clips: Clips to load, e.g. ``manifest.partition("train")`` or one federated shard.
        data_cfg: Sample rate and chunk/hop lengths.
        classes: Class list of the model (``manifest.classes``); a clip's label index is its position here.
        progress: Show a tqdm bar on stderr (only when stderr is a terminal, so logs stay clean).

    Raises:
        DslFedError: no clips, a label not in `classes`, or any `load_audio` error (naming the file).
    """
    clips = list(clips)
    if not clips:
        raise DslFedError("no clips to load (is the partition or shard empty?)")
    index = {label: i for i, label in enumerate(classes)}
    chunk, hop = data_cfg.chunk_samples, data_cfg.hop_samples
    parts: list[np.ndarray] = []
    labels: list[int] = []
    clip_ids: list[int] = []
    speakers: list[str] = []
    # `with` clears the bar before an error propagates, so the CLI's one-line message starts on a clean line
    with tqdm(clips, desc="loading audio", unit="file", disable=None if progress else True, file=sys.stderr, leave=False) as bar:
        for clip in bar:
            if clip.label not in index:
                raise DslFedError(f"{clip.path}: label {clip.label!r} is not one of the model's classes ({', '.join(classes)})")
            windows = normalise_chunks(chunk_signal(load_audio(clip.path, data_cfg.sample_rate), chunk, hop))
            parts.append(windows)
            n = windows.shape[0]
            labels.extend([index[clip.label]] * n)
            clip_ids.extend([clip.clip_id] * n)
            speakers.extend([clip.speaker] * n)
    return ChunkSet(
        waveforms=np.concatenate(parts).astype(np.float32, copy=False),
        labels=np.asarray(labels, dtype=np.int32),
        clip_ids=np.asarray(clip_ids, dtype=np.int32),
        speakers=np.asarray(speakers, dtype=str),
    )


def make_dataset(
    chunks: ChunkSet,
    num_classes: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> "tf.data.Dataset":
    """Batch a `ChunkSet` for Keras.

    Args:
        chunks: In-memory chunks (nothing is decoded here).
        num_classes: Width of the one-hot labels.
        batch_size: Batch size; the last batch may be smaller.
        shuffle: Reshuffle chunks every epoch (deterministic sequence of orders for a given `seed`).
        seed: Shuffle seed.

    Yields ``(waveform float32 (B, chunk_samples), one_hot float32 (B, num_classes))``.
    """
    import tensorflow as tf  # lazily: the CLI's data commands and --help must not pay for TensorFlow

    if len(chunks) == 0:
        raise DslFedError("cannot build a dataset from zero chunks")
    if chunks.labels.min() < 0 or chunks.labels.max() >= num_classes:
        raise DslFedError(f"label index {int(chunks.labels.max())} out of range for {num_classes} classes")
    one_hot = np.eye(num_classes, dtype=np.float32)[chunks.labels]
    ds = tf.data.Dataset.from_tensor_slices((chunks.waveforms, one_hot))
    if shuffle:
        ds = ds.shuffle(len(chunks), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
