"""What a grid of in-process runs ran on, counted from its config and corpus: the numbers a results header states.

A header that says "3 clients of 2 speakers" or "chance 0.333" in a fixed sentence stays true only until someone
runs the grid with another corpus or another override; these numbers are counted instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsl_fed.config import load_config
from dsl_fed.data import load_manifest, partition_speakers


@dataclass(frozen=True)
class RunSetting:
    """The federation and evaluation set one config gives on its corpus."""

    corpus_speakers: int
    client_speakers: tuple[int, ...]  # training speakers of each client, in partition order
    devel_speakers: int
    classes: int
    sampled_per_round: int  # clients asked to train each round
    delta: float  # federated.dp.delta, the delta epsilon is reported at
    clipping: str  # federated.dp.clipping: fixed or adaptive
    num_malicious: int  # federated.num_malicious, the attackers Krum / MultiKrum / Bulyan tolerate

    @property
    def clients(self) -> int:
        return len(self.client_speakers)

    @property
    def chance(self) -> float:
        """UAR of a constant or random guess."""
        return 1 / self.classes

    def clients_text(self) -> str:
        """E.g. "3 clients of 2 speakers", "7 clients of 1 speaker", "3 clients of 1-2 speakers"."""
        low, high = min(self.client_speakers), max(self.client_speakers)
        size = f"{low}" if low == high else f"{low}-{high}"
        return f"{_count(self.clients, 'client')} of {size} speaker{'' if high == 1 else 's'}"

    def sampling_text(self) -> str:
        if self.sampled_per_round >= self.clients:
            return "all sampled every round"
        return f"{self.sampled_per_round} of {self.clients} sampled per round"

    def devel_text(self) -> str:
        """E.g. "2 held-out devel speakers, 3 classes, chance 0.333"."""
        return f"{_count(self.devel_speakers, 'held-out devel speaker')}, {self.classes} classes, chance {self.chance:.3f}"


def run_setting(config_path: Path, overrides: list[str]) -> RunSetting:
    """Count clients, speakers and classes the way a run of this config partitions its corpus."""
    cfg = load_config(config_path, overrides)
    manifest = load_manifest(cfg.data)
    groups = partition_speakers(manifest.speakers("train"), cfg.data.shards, cfg.data.seed)
    return RunSetting(
        corpus_speakers=len(manifest.speakers()),
        client_speakers=tuple(len(group) for group in groups),
        devel_speakers=len(manifest.speakers("devel")),
        classes=len(manifest.classes),
        sampled_per_round=min(cfg.federated.clients_per_round(len(groups)), len(groups)),
        delta=cfg.federated.dp.delta,
        clipping=cfg.federated.dp.clipping,
        num_malicious=cfg.federated.num_malicious,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
