"""Perturbations of a federated simulation, as FedAudio measures robustness (``robustness.*`` in the config).

They act inside the simulation, on the copies of the audio and labels a client holds in memory, and on the
server's choice of clients - never on the user's files:

* `add_noise`: white noise at a given SNR on every training chunk of every client;
* `flip_labels`: a fraction of each client's training *clips* (all their chunks) get a wrong label;
* `skew_shard`: every client except the first keeps only a fraction of its clips, so one client holds most
  of the data;
* `dropped_clients`: a share of the clients sampled for a round drops out before training.

Every draw is seeded, so a rerun perturbs identically: per client by ``(data.seed, partition)``, per round by
``(training.seed, round)``.
"""

from __future__ import annotations

import numpy as np

from dsl_fed.config import RobustnessConfig
from dsl_fed.data.pipeline import ChunkSet
from dsl_fed.errors import DslFedError


def add_noise(waveforms: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white noise to each row so that its signal-to-noise power ratio is exactly `snr_db`.

    The drawn noise is rescaled per row to the power the SNR asks for (rows without energy stay silent).
    """
    x = np.asarray(waveforms, dtype=np.float64)
    noise = rng.standard_normal(x.shape)
    signal_power = np.mean(x ** 2, axis=-1, keepdims=True)
    noise_power = np.mean(noise ** 2, axis=-1, keepdims=True)
    noise *= np.sqrt(signal_power / 10 ** (snr_db / 10) / np.maximum(noise_power, 1e-30))
    return (x + noise).astype(np.float32)


def flip_labels(chunks: ChunkSet, fraction: float, num_classes: int, rng: np.random.Generator) -> ChunkSet:
    """Give ``round(fraction * clips)`` of the clips (all their chunks) a different, random class."""
    if not 0 <= fraction <= 1:
        raise DslFedError(f"robustness.label_flip must be in [0, 1], got {fraction}")
    clips = np.unique(chunks.clip_ids)
    chosen = rng.choice(clips, size=int(round(fraction * clips.size)), replace=False)
    labels = chunks.labels.copy()
    for clip in chosen:
        mask = chunks.clip_ids == clip
        shift = rng.integers(1, num_classes)  # 1 .. C-1: never the true class
        labels[mask] = (labels[mask] + shift) % num_classes
    return ChunkSet(chunks.waveforms, labels, chunks.clip_ids, chunks.speakers)


def skew_shard(chunks: ChunkSet, keep: float, rng: np.random.Generator) -> ChunkSet:
    """Keep ``max(1, round(keep * clips))`` of the clips (whole clips, seeded)."""
    clips = np.unique(chunks.clip_ids)
    kept = rng.choice(clips, size=max(1, int(round(keep * clips.size))), replace=False)
    mask = np.isin(chunks.clip_ids, kept)
    return ChunkSet(chunks.waveforms[mask], chunks.labels[mask], chunks.clip_ids[mask], chunks.speakers[mask])


def dropped_clients(num_sampled: int, share: float, seed: int, server_round: int) -> np.ndarray:
    """Positions (0-based, sorted) of the ``round(share * num_sampled)`` sampled clients that drop out."""
    rng = np.random.default_rng([seed, server_round, 0xD209])
    return np.sort(rng.permutation(num_sampled)[: int(round(share * num_sampled))])


def perturb_client(chunks: ChunkSet, rob: RobustnessConfig, num_classes: int, partition: int, seed: int) -> ChunkSet:
    """A client's training chunks with the configured perturbations (the same on every round)."""
    rng = np.random.default_rng([seed, partition, 0x0B5])
    if rob.shard_skew > 0 and partition > 0:
        chunks = skew_shard(chunks, 1 - rob.shard_skew, rng)
    if rob.label_flip > 0:
        chunks = flip_labels(chunks, rob.label_flip, num_classes, rng)
    if rob.noise_snr_db is not None:
        chunks = ChunkSet(add_noise(chunks.waveforms, rob.noise_snr_db, rng), chunks.labels, chunks.clip_ids,
                          chunks.speakers)
    return chunks
