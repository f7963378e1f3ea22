"""The privacy audit's corpus: who is a member of which federation, which clips train, what each voice is.

One arousal corpus (`dsl_fed.data.arousal`) is cut into four disjoint groups of speakers: the target
federation's clients (members), speakers it never saw (non-members), and the same two groups for the
attacker's shadow federation, which calibrates the attack on speakers whose membership the attacker knows.
A member trains on its first `train_clips` clips per class; its later clips are "fresh" (never trained on by
anyone), so the attack can also be scored on clips the model never saw - membership of the speaker, not of
the clip. Non-members' clips are split at the same index, so both sides are scored on as many clips.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsl_fed.data.arousal import speaker_baseline
from dsl_fed.io import atomic_write

ROLES = ("target-in", "target-out", "shadow-in", "shadow-out")
PITCH_CUTS = (-25 / 3, 25 / 3)  # the generator draws a speaker's pitch offset uniformly in [-25, 25] %


@dataclass(frozen=True)
class AuditClip:
    filename: str  # relative to the corpus folder, as in its manifest
    label: str
    speaker: str
    index: int  # the clip's number within its speaker and class (``<class>_<index>.wav``)


def read_corpus(manifest: Path) -> list[AuditClip]:
    """The corpus manifest's clips, in manifest order (= clip ids of `dsl_fed.data.read_manifest`)."""
    with manifest.open(newline="") as f:
        return [AuditClip(row["filename"], row["label"], row["speaker"], int(Path(row["filename"]).stem.rsplit("_", 1)[1]))
                for row in csv.DictReader(f)]


def assign_roles(speakers: list[str], members: int, seed: int) -> dict[str, list[str]]:
    """`members` speakers in each federation, the others split evenly as non-members; sorted per role."""
    if members < 2 or len(speakers) < 2 * members + 2:
        raise ValueError(f"need >= 2 members per federation and >= 1 non-member each: {len(speakers)} speakers "
                         f"cannot hold 2 x {members} members")
    order = [speakers[i] for i in np.random.default_rng([seed, 0xA0D1]).permutation(len(speakers))]
    half = (len(speakers) - 2 * members) // 2
    cuts = {"target-in": order[:members], "shadow-in": order[members:2 * members],
            "target-out": order[2 * members:2 * members + half], "shadow-out": order[2 * members + half:]}
    return {role: sorted(cuts[role]) for role in ROLES}


def write_federation_manifest(path: Path, corpus: Path, clips: list[AuditClip], train: list[str], devel: list[str],
                              train_clips: int) -> Path:
    """`train` speakers' first `train_clips` clips per class, `devel` speakers' likewise (audio paths absolute)."""
    part = {**{s: "train" for s in train}, **{s: "devel" for s in devel}}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", "label", "speaker", "partition"])
    writer.writerows([str((corpus / c.filename).resolve()), c.label, c.speaker, part[c.speaker]] for c in clips
                     if c.speaker in part and c.index < train_clips)
    return atomic_write(path, buf.getvalue())


def pitch_group(speaker: str, corpus_seed: int) -> str:
    """Tertile of the speaker's drawn pitch offset: ``low`` (< -8.3 %), ``mid`` or ``high`` (> +8.3 %)."""
    pitch = speaker_baseline(_index(speaker), corpus_seed).pitch
    return "low" if pitch < PITCH_CUTS[0] else "high" if pitch > PITCH_CUTS[1] else "mid"


def voice_sex(speaker: str, corpus_seed: int) -> str | None:
    """``m`` / ``f`` for eSpeak's male (m1-m7) and female (f1-f5) variants, None for the others (klatt, ...)."""
    variant = speaker_baseline(_index(speaker), corpus_seed).voice.split("+")[1]
    return variant[0] if variant[0] in "mf" and variant[1:].isdigit() else None


def _index(speaker: str) -> int:
    return int(speaker.removeprefix("spk")) - 1  # the generator names speaker k "spk{k + 1:04d}"
