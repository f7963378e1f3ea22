"""Central differential privacy of the slice update, with noise that only the server's OS entropy decides.

Flower's DP strategy wrappers draw their Gaussian noise from the global NumPy generator, and the ServerApp seeds
that generator with the public ``training.seed`` (``keras.utils.set_random_seed`` when it builds the model): anyone
holding the run's ``config.yaml`` could regenerate the noise, subtract it from a published round and recover the
exact mean of the clipped updates. `DpMean` does the wrappers' job with code of its own - clip each update to the
clipping norm (server mode) or take the nodes' clipped updates (client mode), average them, add Gaussian noise,
adapt the clipping norm (Andrew et al., 2021) - and draws every random number from a generator seeded with 128
bits from `secrets`, fresh for every draw: no config, checkpoint, resume or earlier seeding can replay it.

The noise is sized for the updates actually averaged: a round that averages m updates (m may be below the
planned sample: failed, rejected or dropped clients, fewer nodes connected) gets noise of standard deviation
``z · clip_norm / m`` on the mean, i.e. ``z · clip_norm`` on the sum of the m clipped updates. Every release is
thus one Gaussian mechanism with multiplier z and sensitivity ``clip_norm`` (one client's update), whatever m was,
and `dsl_fed.privacy` composes exactly those releases (`DpMean.releases`). Who took part is published (the round
manifests list the nodes), so the count m reveals nothing new and the guarantee is conditional on it.

Adaptive clipping releases a noisy count of clipped updates besides the noisy mean. Its usual count noise, n/20,
suits hundreds of clients; with a handful it cannot reach the requested noise multiplier at all, so the count gets
noise ``max(n/20, noise_multiplier)`` and the update the multiplier that makes the pair exactly as private as one
Gaussian release with ``noise_multiplier`` (`noise_split`). The noise of a round is sized with the clipping norm
the round clipped with (Flower's adaptive wrappers size it with the norm already adapted for the next round).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from dsl_fed.config import DpConfig

TARGET_CLIPPED_QUANTILE = 0.5  # adaptive clipping: aim at clipping half of the updates (Andrew et al.)
CLIP_NORM_LR = 0.2  # adaptive clipping: geometric step of the clipping norm (Andrew et al.)


def secret_rng() -> np.random.Generator:
    """A generator seeded from OS entropy; never from a config seed, never the global NumPy state."""
    return np.random.default_rng(secrets.randbits(128))


def noise_split(noise_multiplier: float, num_sampled: int, adaptive: bool) -> tuple[float, float]:
    """(update noise multiplier, clipped-count noise std) that together are as private as Gaussian(z).

    Fixed clipping releases only the update: the multiplier is z itself. Adaptive clipping also releases the
    count of clipped updates, a sum of bits with sensitivity 1/2 (Andrew et al., 2021, Theorem 1):
    ``1/z² = 1/z_update² + 1/(2·count_std)²``.
    """
    z = noise_multiplier
    if not adaptive or z <= 0:
        return z, 0.0
    count_std = max(num_sampled / 20, z)
    return (z ** -2 - (2 * count_std) ** -2) ** -0.5, count_std


class DpMean(Strategy):
    """Wraps a slice rule that takes a plain mean: clip, average, add secret Gaussian noise.

    Args:
        rule: Samples the nodes and averages the (clipped) replies; every reply must weigh the same.
        dp: ``federated.dp``.
        num_sampled: Clients a round samples (the adaptive count noise is sized for it).

    Attributes:
        releases: Noised means published so far (a round without an update releases nothing).
    """

    def __init__(self, rule: Strategy, dp: DpConfig, num_sampled: int) -> None:
        super().__init__()
        self.rule = rule
        self.dp = dp
        self.num_sampled = num_sampled
        self.clipping_norm = dp.clip_norm
        self.noise_multiplier, self.count_stddev = noise_split(dp.noise_multiplier, num_sampled,
                                                               dp.clipping == "adaptive")
        self.last_stddev = 0.0  # noise std of the last release (per coordinate of the mean)
        self.releases = 0
        self._current: dict[str, np.ndarray] = {}  # the round's global slice, what updates are measured from

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current = {name: array.numpy().astype(np.float64) for name, array in arrays.items()}
        if self.dp.mode == "client":
            config[KEY_CLIPPING_NORM] = self.clipping_norm  # the node's clipping mod clips to it
        return self.rule.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return None, None
        clipped = [self._clip(reply) for reply in replies]
        aggregated, metrics = self.rule.aggregate_train(server_round, replies)
        if aggregated is None:
            return None, None
        # sized for the m updates in this mean, with the norm they were clipped to
        self.last_stddev = self.noise_multiplier * self.clipping_norm / len(replies)
        noised = add_noise(aggregated, self.last_stddev)
        self.releases += 1
        if self.dp.clipping == "adaptive":
            self._adapt(sum(clipped), len(replies))
        return noised, metrics

    def _clip(self, reply: Message) -> bool:
        """Clip the reply's update in place (server mode); whether it was above the clipping norm."""
        if self.dp.mode == "client":
            metrics = next(iter(reply.content.metric_records.values()))
            return bool(metrics.get(KEY_NORM_BIT, False))
        key, record = next(iter(reply.content.array_records.items()))
        update = {n: a.numpy().astype(np.float64) - self._current[n] for n, a in record.items()}
        total = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
        scale = min(1.0, self.clipping_norm / total) if total > 0 else 1.0
        reply.content[key] = ArrayRecord({n: Array(np.asarray(self._current[n] + scale * u, np.float32))
                                          for n, u in update.items()})
        return scale < 1.0

    def _adapt(self, clipped: int, total: int) -> None:
        """Geometric update of the clipping norm towards the target quantile, from a noisy clipped count."""
        noisy = (clipped + secret_rng().normal(0.0, self.count_stddev)) / total if self.count_stddev > 0 else clipped / total
        self.clipping_norm *= math.exp(-CLIP_NORM_LR * (noisy - TARGET_CLIPPED_QUANTILE))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.rule.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.rule.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Nothing to add: the owning strategy logs its summary."""


def add_noise(arrays: ArrayRecord, stddev: float) -> ArrayRecord:
    """`arrays` plus independent N(0, stddev²) noise per coordinate, drawn from OS entropy (float32 out)."""
    rng = secret_rng()
    out = {}
    for name, array in arrays.items():
        values = array.numpy().astype(np.float64)
        out[name] = Array(np.asarray(values + rng.normal(0.0, stddev, values.shape), np.float32))
    return ArrayRecord(out)
