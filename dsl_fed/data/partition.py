"""Federated shards: which training speakers each client holds.

A speaker is the natural unit of a federated client (one phone, one person), so a speaker is never split
across shards: a shard's data never overlaps another's, and per-client results stay speaker-independent.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from dsl_fed.data.manifest import Clip
from dsl_fed.errors import DslFedError


def partition_speakers(speakers: Iterable[str], num_shards: int, seed: int = 0) -> list[list[str]]:
    """Group speakers into federated shards.

    Args:
        speakers: Speaker names (duplicates and order do not matter).
        num_shards: 0 = one shard per speaker, in sorted speaker order (the natural client id); N >= 1 = N
            shards: the sorted speakers are shuffled with `seed` and dealt round-robin, so shard sizes differ
            by at most one speaker.
        seed: Seed of the shuffle (ignored for ``num_shards=0``).

    Returns:
        One sorted list of speakers per shard.

    Raises:
        DslFedError: no speakers, a negative `num_shards`, or more shards than speakers.
    """
    unique = sorted(set(speakers))
    if not unique:
        raise DslFedError("cannot build federated shards: there are no training speakers")
    if num_shards < 0:
        raise DslFedError(f"data.shards must be >= 0 (0 = one shard per speaker), got {num_shards}")
    if num_shards == 0:
        return [[s] for s in unique]
    if num_shards > len(unique):
        raise DslFedError(
            f"data.shards={num_shards} but there are only {len(unique)} training speakers; a speaker is never "
            f"split, so use data.shards <= {len(unique)} (or 0 for one shard per speaker)"
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    return [sorted(shuffled[k::num_shards]) for k in range(num_shards)]


def shard_clips(clips: Iterable[Clip], num_shards: int, seed: int = 0) -> list[list[Clip]]:
    """Split clips (normally the train partition) into the shards of `partition_speakers`.

    Returns:
        For each shard, its clips in their original order.
    """
    clips = list(clips)
    shards = partition_speakers((c.speaker for c in clips), num_shards, seed)
    shard_of = {speaker: k for k, group in enumerate(shards) for speaker in group}
    out: list[list[Clip]] = [[] for _ in shards]
    for clip in clips:
        out[shard_of[clip.speaker]].append(clip)
    return out
