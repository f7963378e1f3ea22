"""Privacy accounting for client-level DP-FedAvg with Google's dp-accounting library (no Flower here).

Each round releases the mean of the sampled clients' clipped slice updates plus Gaussian noise of standard
deviation ``noise_multiplier * clip_norm / clients``: a Gaussian mechanism with that noise multiplier on the
sum. With ``fraction_train < 1`` a round samples each client with probability ``fraction_train``, accounted
as Poisson subsampling (McMahan et al., 2018; Flower samples a fixed number of clients, which this
approximates). The RDP accountant composes the rounds and converts to (epsilon, delta).

One speaker per client makes the guarantee speaker-level: any one speaker's whole contribution changes what
the server publishes only within epsilon. It covers the model, not the metrics a client reports.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dp_accounting
from dp_accounting import rdp

from dsl_fed.config import DpConfig, FederatedConfig

NO_GUARANTEE = "no DP guarantee"


def dp_event(noise_multiplier: float, sampling_rate: float, rounds: int) -> dp_accounting.DpEvent:
    """The dp-accounting event of `rounds` rounds of the (subsampled) Gaussian mechanism."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step = gaussian if sampling_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, rounds)


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float | None:
    """Epsilon after `rounds` rounds at `delta`; None when there is no noise (no guarantee, not infinity)."""
    if noise_multiplier <= 0:
        return None
    if rounds <= 0:
        return 0.0
    with _quiet_absl():
        accountant = rdp.RdpAccountant()
        accountant.compose(dp_event(noise_multiplier, sampling_rate, rounds))
        return float(accountant.get_epsilon(delta))


def rounds_within_budget(noise_multiplier: float, sampling_rate: float, delta: float, target_epsilon: float,
                         max_rounds: int) -> int:
    """The most rounds (up to `max_rounds`) whose epsilon stays <= `target_epsilon` (epsilon grows with rounds)."""
    low, high = 0, max_rounds  # epsilon(low) <= target is invariant; binary search for the last such round
    while low < high:
        mid = (low + high + 1) // 2
        if epsilon(noise_multiplier, sampling_rate, mid, delta) <= target_epsilon:
            low = mid
        else:
            high = mid - 1
    return low


def describe(eps: float | None, delta: float) -> str:
    """Human form for logs and reports: ``ε 3.21 (δ 1e-05)`` or ``no DP guarantee``."""
    return NO_GUARANTEE if eps is None else f"ε {eps:.3g} (δ {delta:g})" if math.isfinite(eps) else f"ε inf (δ {delta:g})"


@dataclass(frozen=True)
class RunPrivacy:
    """The privacy budget of one federated run: epsilon per round and the last round a target allows."""

    dp: DpConfig
    sampling_rate: float  # clients per round / clients

    @classmethod
    def of(cls, fed: FederatedConfig, num_nodes: int) -> "RunPrivacy":
        return cls(fed.dp, min(1.0, fed.clients_per_round(num_nodes) / num_nodes))

    def epsilon(self, rounds: int) -> float | None:
        return epsilon(self.dp.noise_multiplier, self.sampling_rate, rounds, self.dp.delta)

    def last_round(self, scheduled: int) -> int:
        """`scheduled`, or fewer if ``target_epsilon`` would be exceeded after more rounds."""
        if self.dp.target_epsilon is None:
            return scheduled
        return rounds_within_budget(self.dp.noise_multiplier, self.sampling_rate, self.dp.delta,
                                    self.dp.target_epsilon, scheduled)

    def report(self, rounds: int, clip_norm: float) -> dict[str, Any]:
        """What a round manifest records: every round so far counts, including one whose update was dropped."""
        eps = self.epsilon(rounds)
        return {"mode": self.dp.mode, "clipping": self.dp.clipping, "clip_norm": clip_norm,
                "noise_multiplier": self.dp.noise_multiplier, "sampling_rate": self.sampling_rate,
                "rounds": rounds, "epsilon": eps, "delta": self.dp.delta, "target_epsilon": self.dp.target_epsilon,
                "guarantee": describe(eps, self.dp.delta), "accountant": "dp-accounting RDP"}


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
