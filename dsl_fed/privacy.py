"""Privacy accounting for client-level DP-FedAvg with Google's dp-accounting library (no Flower here).

Each published round releases the mean of m clipped slice updates plus Gaussian noise of standard deviation
``noise_multiplier * clip_norm / m`` (`dsl_fed.federated.dp`): a Gaussian mechanism with that noise multiplier
on the sum, whatever m was. The RDP accountant composes the releases and converts to (epsilon, delta); it agrees
with Flower 1.42's own accountant (`flwr.supercore.privacy_accounting`, no amplification) and stays within a few
per cent above dp-accounting's tighter PLD accountant (`tests/test_privacy.py`).

No amplification by sampling is claimed: with ``fraction_train < 1`` a round samples a fixed number of nodes with a
generator seeded by the public ``training.seed`` and the round manifests publish who was sampled, so each round is
accounted as if every client had taken part. A round whose update was not released (too few valid replies)
costs nothing.

One speaker per client makes the guarantee speaker-level: any one speaker's whole contribution changes what
the server publishes only within epsilon - if the corpus names its speakers: without a speaker column every
clip is its own speaker, and `check_speakers` refuses DP on such a corpus unless ``data.clip_level_privacy``
accepts that epsilon then protects single clips (reported as clip-level). It covers the published models;
under DP the server publishes none of the clients' statistics beside them (no losses, local UARs, example
counts, clipped bits or timings).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsl_fed.config import Config, DpConfig, FederatedConfig
from dsl_fed.errors import DslFedError

if TYPE_CHECKING:
    import dp_accounting

    from dsl_fed.data import Manifest

NO_GUARANTEE = "no DP guarantee"


def dp_event(noise_multiplier: float, releases: int) -> dp_accounting.DpEvent:
    """The dp-accounting event of `releases` Gaussian releases (no amplification by sampling)."""
    import dp_accounting  # a second to import: only when an epsilon is computed, not at every command's start

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), releases)


def epsilon(noise_multiplier: float, releases: int, delta: float) -> float | None:
    """Epsilon after `releases` noised rounds at `delta`; None when there is no noise (no guarantee, not infinity)."""
    if noise_multiplier <= 0:
        return None
    if releases <= 0:
        return 0.0
    from dp_accounting import rdp

    with _quiet_absl():
        accountant = rdp.RdpAccountant()
        accountant.compose(dp_event(noise_multiplier, releases))
        return float(accountant.get_epsilon(delta))


def rounds_within_budget(noise_multiplier: float, delta: float, target_epsilon: float, max_rounds: int) -> int:
    """The most rounds (up to `max_rounds`) whose epsilon stays <= `target_epsilon`, each round counted as a release."""
    low, high = 0, max_rounds  # epsilon(low) <= target is invariant; binary search for the last such round
    while low < high:
        mid = (low + high + 1) // 2
        if epsilon(noise_multiplier, mid, delta) <= target_epsilon:
            low = mid
        else:
            high = mid - 1
    return low


def noise_for_epsilon(target_epsilon: float, releases: int, delta: float, tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (within `tolerance`, rounded up) whose epsilon after `releases` rounds is at most
    `target_epsilon`: to compare runs at equal privacy rather than at equal noise."""
    if target_epsilon <= 0 or releases < 1:
        raise ValueError(f"need target_epsilon > 0 and releases >= 1, got {target_epsilon}, {releases}")
    low, high = 0.0, 1.0
    while epsilon(high, releases, delta) > target_epsilon:  # epsilon falls as the noise grows
        low, high = high, high * 2
    while high - low > tolerance:
        mid = (low + high) / 2
        if mid > 0 and epsilon(mid, releases, delta) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def describe(eps: float | None, delta: float) -> str:
    """Human form for logs and reports: ``ε 3.21 (δ 1e-05)`` or ``no DP guarantee``."""
    return NO_GUARANTEE if eps is None else f"ε {eps:.3g} (δ {delta:g})" if math.isfinite(eps) else f"ε inf (δ {delta:g})"


def check_speakers(cfg: Config, manifest: "Manifest") -> None:
    """Refuse ``federated.dp`` on a corpus whose clips name no speaker, unless clip-level privacy is accepted.

    Without speaker ids every clip is its own speaker: one person's clips spread over many clients, and epsilon
    bounds what the models reveal about one clip, not about one speaker.
    """
    if cfg.federated.dp.enabled and manifest.unattributed and not cfg.data.clip_level_privacy:
        raise DslFedError(
            f"federated.dp: {manifest.source or 'the manifest'}: {manifest.unattributed} of {len(manifest.clips)} clips "
            "have no speaker, so each is its own speaker and epsilon would protect single clips, not speakers; add "
            "a speaker column (or speaker folders) or set data.clip_level_privacy: true to accept clip-level privacy")


def privacy_unit(cfg: Config) -> str:
    """What one client's worth of data is, i.e. what epsilon protects, in words for reports."""
    if cfg.data.clip_level_privacy:
        return "clip-level (data.clip_level_privacy: clips without a speaker count as their own speaker)"
    if cfg.data.shards == 0:
        return "speaker-level (one speaker per client)"
    return "client-level (each client's group of speakers, so each of its speakers)"


@dataclass(frozen=True)
class RunPrivacy:
    """The privacy budget of one federated run: epsilon per release and the last round a target allows."""

    dp: DpConfig
    clients_per_round: int  # reported only: no amplification is claimed
    nodes: int
    unit: str = "client-level"  # what epsilon protects (`privacy_unit`)
    availability: bool = False  # federated.availability: the sample is drawn among the online nodes

    @classmethod
    def of(cls, fed: FederatedConfig, num_nodes: int, unit: str = "client-level") -> "RunPrivacy":
        return cls(fed.dp, fed.clients_per_round(num_nodes), num_nodes, unit, bool(fed.availability))

    def epsilon(self, releases: int) -> float | None:
        return epsilon(self.dp.noise_multiplier, releases, self.dp.delta)

    def last_round(self, scheduled: int) -> int:
        """`scheduled`, or fewer if ``target_epsilon`` would be exceeded after more (every round may release)."""
        if self.dp.target_epsilon is None:
            return scheduled
        return rounds_within_budget(self.dp.noise_multiplier, self.dp.delta, self.dp.target_epsilon, scheduled)

    def report(self, releases: int, clip_norm: float) -> dict[str, Any]:
        """What a round manifest records: epsilon after the noised means released so far."""
        eps = self.epsilon(releases)
        return {"mode": self.dp.mode, "clipping": self.dp.clipping, "clip_norm": clip_norm,
                "noise_multiplier": self.dp.noise_multiplier, "releases": releases,
                "sampling": f"{self.clients_per_round} of {self.nodes} nodes per round"
                            + (" when all are online (federated.availability: the same share of the online ones)"
                               if self.availability else "")
                            + ", accounted without amplification (the sample is seeded and published)",
                "epsilon": eps, "delta": self.dp.delta, "target_epsilon": self.dp.target_epsilon,
                "unit": self.unit, "guarantee": self.guarantee(eps), "accountant": "dp-accounting RDP"}

    def guarantee(self, eps: float | None) -> str:
        """`describe`, saying when the unit is a clip rather than a speaker or client."""
        text = describe(eps, self.dp.delta)
        return f"{text}, clip-level" if eps is not None and self.unit.startswith("clip") else text


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """The RDP accountant warns (via absl) for every Rényi order it skips; those orders only loosen the bound."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
