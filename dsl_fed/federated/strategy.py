"""Partial aggregation by weight name on top of Flower's strategies, with the paper's two-phase schedule.

Only the trainable slice travels after a node first receives the model: phase 1 the head, phase 2 the head plus
the unfrozen top of the backbone. Flower's `Strategy.start` replaces its global arrays with whatever
`aggregate_train` returns, so a strategy that aggregated just the slice would shrink the global model to it.
`SliceAggregation` therefore keeps the full model itself, sends the slice, checks every reply, lets the Flower
strategy aggregate the slice (FedAvg, FedProx, FedAdam, FedYogi), merges the result back and returns the full
model. Weights are addressed by name, never by list position.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.fedadam import FedAdam
from flwr.serverapp.strategy.fedyogi import FedYogi

from dsl_fed.config import FederatedConfig
from dsl_fed.federated.run_config import PROGRESS_MARK
from dsl_fed.robustness import dropped_clients

LOG = logging.getLogger("flwr").getChild("dsl_fed")  # Flower's handler streams it to `flwr run --stream`

SUMMED_METRICS = ("train-seconds", "work-seconds")  # per-client totals; the rest are example-weighted means
DROPPED_METRICS = ("partition-id",)  # identifies the client, meaningless once averaged


@dataclass(frozen=True)
class PhaseSchedule:
    """Rounds 1..phase1_rounds train the head (phase 1), the next phase2_rounds the head + top layers."""

    phase1_rounds: int
    phase2_rounds: int

    @classmethod
    def from_config(cls, fed: FederatedConfig) -> "PhaseSchedule":
        return cls(fed.phase1_rounds, fed.phase2_rounds)

    @property
    def num_rounds(self) -> int:
        return self.phase1_rounds + self.phase2_rounds

    def phase(self, server_round: int) -> int:
        """Phase (1 or 2) of an absolute, 1-based round."""
        if not 1 <= server_round <= self.num_rounds:
            raise ValueError(f"round {server_round} is outside the schedule 1..{self.num_rounds}")
        return 1 if server_round <= self.phase1_rounds else 2


@dataclass
class RoundStats:
    """What happened in one round, for logs, manifests and history.csv."""

    round: int
    phase: int
    sampled: int = 0
    dropped: int = 0  # sampled clients that dropped out before training (robustness.client_dropout)
    aggregated: int = 0
    num_examples: int = 0
    client_seconds: float = 0.0  # sum of the clients' local training time (train_local)
    client_work_seconds: float = 0.0  # sum of the clients' whole handler time (training + model build + scoring)
    bytes_down: int = 0  # array payload sent to clients (train + evaluate messages)
    bytes_up: int = 0  # array payload received from clients
    updated: bool = False  # False: too few valid updates, the global model stayed as it was
    train_metrics: dict[str, float] = field(default_factory=dict)  # aggregated client metrics
    failed: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def aggregate_client_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean of the clients' scalar metrics; totals for examples and training seconds."""
    weights = [float(_metrics(r)[weighted_by_key]) for r in records]
    total = sum(weights)
    out = MetricRecord({weighted_by_key: int(total)})
    for record, weight in zip(records, weights, strict=True):
        for key, value in _metrics(record).items():
            if key == weighted_by_key or key in DROPPED_METRICS or isinstance(value, list):
                continue
            part = float(value) if key in SUMMED_METRICS else float(value) * weight / total
            out[key] = float(out[key]) + part if key in out else part
    return out


class SliceAggregation:
    """Mixin (put it before a Flower strategy class) for partial aggregation of a named weight slice.

    Args:
        model_arrays: The full model, weight name -> array (the server's master copy, float32).
        slice_names: Phase -> names of the weights trained (and exchanged) in that phase; phase 1's names must
            be a subset of phase 2's, so weights outside the current slice are the same everywhere.
        schedule: Phase of each round.
        transfer_dtype: ``float32`` or ``float16`` (halves the bytes; the server still aggregates in float32).
        round_offset: Rounds already completed (resume): Flower counts from 1 again, the schedule does not.
        seed: Seeds node sampling per round, so a resumed run samples like an uninterrupted one.
        client_dropout: Share of the sampled clients that drop out of each round (seeded by `seed` and round).
        **strategy_kwargs: Passed to the Flower strategy (fractions, min nodes, proximal_mu, eta, ...).
    """

    def __init__(
        self,
        *,
        model_arrays: Mapping[str, np.ndarray],
        slice_names: Mapping[int, Sequence[str]],
        schedule: PhaseSchedule,
        transfer_dtype: str = "float32",
        round_offset: int = 0,
        seed: int = 0,
        client_dropout: float = 0.0,
        **strategy_kwargs,
    ) -> None:
        strategy_kwargs.setdefault("train_metrics_aggr_fn", aggregate_client_metrics)
        super().__init__(**strategy_kwargs)
        self.model_arrays = {k: np.array(v) for k, v in model_arrays.items()}
        self.slice_names = {phase: list(names) for phase, names in slice_names.items()}
        for phase, names in self.slice_names.items():
            unknown = sorted(set(names) - set(self.model_arrays))
            if unknown:
                raise ValueError(f"phase {phase} slice names weights the model lacks: {unknown[:3]}")
        if 1 in self.slice_names and 2 in self.slice_names and not set(self.slice_names[1]) <= set(self.slice_names[2]):
            raise ValueError("the phase-1 slice must be contained in the phase-2 slice")
        if transfer_dtype not in ("float32", "float16"):
            raise ValueError(f"transfer_dtype must be float32 or float16, got {transfer_dtype!r}")
        self.schedule = schedule
        self.transfer_dtype = transfer_dtype
        self.round_offset = round_offset
        self.seed = seed
        self.client_dropout = client_dropout
        self.rounds: dict[int, RoundStats] = {}
        self._nodes_with_model: set[int] = set()  # nodes known to hold the full model in their node state

    # ------------------------------------------------------------------------------------------- sending

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the phase's slice (the full model to nodes that have not received it yet).

        `arrays` (what `start` holds) is ignored: it is the same full model as `self.model_arrays`.
        """
        rnd = server_round + self.round_offset
        phase = self.schedule.phase(rnd)
        names = self.slice_names[phase]
        self.rounds[rnd] = stats = RoundStats(round=rnd, phase=phase)
        self._align_optimizer_state(names)
        config["phase"] = phase
        config["transfer-dtype"] = self.transfer_dtype
        random.seed(f"train-{self.seed}-{rnd}")  # Flower samples nodes with the global `random`
        # FedOpt strategies remember these arrays as x_t: give them the float32 slice, not the transfer copy.
        messages = list(super().configure_train(rnd, self._record(names, "float32"), config, grid))
        stats.sampled = len(messages)
        if self.client_dropout > 0:
            dropped = set(dropped_clients(len(messages), self.client_dropout, self.seed, rnd).tolist())
            messages = [m for i, m in enumerate(messages) if i not in dropped]
            stats.dropped = len(dropped)
        return self._address(messages, names, config, stats)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages carry the same slice as training (clients already hold the rest)."""
        rnd = server_round + self.round_offset
        names = self.slice_names[self.schedule.phase(rnd)]
        config["transfer-dtype"] = self.transfer_dtype
        random.seed(f"evaluate-{self.seed}-{rnd}")
        messages = list(super().configure_evaluate(rnd, ArrayRecord(), config, grid))
        stats = self.rounds.setdefault(rnd, RoundStats(round=rnd, phase=self.schedule.phase(rnd)))
        return self._address(messages, names, config, stats)

    def _address(self, messages: list[Message], names: list[str], config: ConfigRecord, stats: RoundStats) -> list[Message]:
        """Give each message its payload: the full model (float32, once per node) or the slice."""
        payloads: dict[bool, tuple[RecordDict, int]] = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            full = node not in self._nodes_with_model
            if full not in payloads:
                # float32 for the full model: every node's frozen weights must equal the server's exactly.
                arrays = self._record(list(self.model_arrays), "float32") if full else self._record(names, self.transfer_dtype)
                content = RecordDict({self.arrayrecord_key: arrays,
                                      self.configrecord_key: ConfigRecord({**dict(config), "full-model": full})})
                payloads[full] = (content, arrays.count_bytes())
            msg.content, size = payloads[full]
            stats.bytes_down += size
            self._nodes_with_model.add(node)  # dropped again if the node's reply is an error
        return messages

    def _record(self, names: Sequence[str], dtype: str) -> ArrayRecord:
        return ArrayRecord({n: Array(_cast(self.model_arrays[n], dtype)) for n in names})

    # ----------------------------------------------------------------------------------------- receiving

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed and invalid replies, aggregate the slice, merge it into the full model and return that."""
        rnd = server_round + self.round_offset
        stats = self.rounds[rnd]
        names = self.slice_names[stats.phase]
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._nodes_with_model.discard(node)
                reason = short_reason(msg.error.reason)
                stats.failed.append(f"node {node}: {reason}")
                LOG.warning("%s round %d: node %d failed and is left out: %s", PROGRESS_MARK, rnd, node, reason)
                continue
            stats.bytes_up += sum(r.count_bytes() for r in msg.content.array_records.values())
            problem = self._check_update(msg.content, names)
            if problem:
                who = f"node {node} (partition {_metrics(msg.content).get('partition-id', '?')})"
                stats.rejected.append(f"{who}: {problem}")
                LOG.warning("%s round %d: rejected the update of %s: %s", PROGRESS_MARK, rnd, who, problem)
                continue
            msg.content = self._as_float32(msg.content)
            valid.append(msg)
        # A fixed order makes the float sums, and so a resumed run, reproducible.
        valid.sort(key=lambda m: (_metrics(m.content).get("partition-id", 0), m.metadata.src_node_id))
        if len(valid) < max(self.min_train_nodes, 1):
            LOG.warning(
                "%s round %d: %d valid update(s), fewer than min_train_nodes=%d; the global model is unchanged",
                PROGRESS_MARK, rnd, len(valid), self.min_train_nodes,
            )
            return None, None
        aggregated, metrics = super().aggregate_train(rnd, valid)
        if aggregated is None:
            return None, None
        for name, array in aggregated.items():
            self.model_arrays[name] = array.numpy().astype(self.model_arrays[name].dtype)
        stats.aggregated = len(valid)
        stats.updated = True
        stats.num_examples = int(sum(float(_metrics(m.content)[self.weighted_by_key]) for m in valid))
        stats.client_seconds = float(sum(float(_metrics(m.content).get("train-seconds", 0.0)) for m in valid))
        stats.client_work_seconds = float(sum(float(_metrics(m.content).get("work-seconds", 0.0)) for m in valid))
        stats.train_metrics = {k: float(v) for k, v in (metrics or {}).items() if not isinstance(v, list)}
        return self.full_record(), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average client-side evaluation over the clients that had held-out clips."""
        rnd = server_round + self.round_offset
        valid = []
        for msg in replies:
            if msg.has_error():
                self._nodes_with_model.discard(msg.metadata.src_node_id)
                LOG.warning(
                    "%s round %d: evaluation on node %d failed: %s",
                    PROGRESS_MARK, rnd, msg.metadata.src_node_id, short_reason(msg.error.reason),
                )
            elif float(_metrics(msg.content).get(self.weighted_by_key, 0)) > 0:
                valid.append(msg)
        return super().aggregate_evaluate(rnd, valid) if valid else None

    def _check_update(self, content: RecordDict, names: list[str]) -> str | None:
        """Why a client's update must not be aggregated, or None if it is fine."""
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "expected exactly one ArrayRecord and one MetricRecord"
        arrays = next(iter(content.array_records.values()))
        missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
        if missing or extra:
            return f"weights do not match the phase's slice (missing {missing[:3]}, unexpected {extra[:3]})"
        weight = _metrics(content).get(self.weighted_by_key)
        if not isinstance(weight, (int, float)) or not weight > 0:
            return f"{self.weighted_by_key} must be a positive number, got {weight!r}"
        for name in names:
            array = arrays[name].numpy()
            if array.shape != self.model_arrays[name].shape:
                return f"{name} has shape {array.shape}, expected {self.model_arrays[name].shape}"
            if not np.all(np.isfinite(array)):
                return f"non-finite values in {name}"
        for key, value in _metrics(content).items():
            if not np.all(np.isfinite(np.asarray(value, dtype=float))):
                return f"non-finite metric {key}={value}"
        return None

    @staticmethod
    def _as_float32(content: RecordDict) -> RecordDict:
        """Aggregate in float32 even when the update travelled as float16."""
        (array_key, arrays), (metric_key, metrics) = *content.array_records.items(), *content.metric_records.items()
        float32 = ArrayRecord({n: Array(a.numpy().astype(np.float32)) for n, a in arrays.items()})
        return RecordDict({array_key: float32, metric_key: metrics})

    # ----------------------------------------------------------------------------------------- state

    def full_record(self) -> ArrayRecord:
        """The server's full model as an ArrayRecord (what `start` hands to `evaluate_fn`)."""
        return ArrayRecord({n: Array(a) for n, a in self.model_arrays.items()})

    def _align_optimizer_state(self, names: list[str]) -> None:
        """FedAdam/FedYogi keep moments per weight; a phase change adds weights whose moments start at zero."""
        for attr in ("m_t", "v_t"):
            moments = getattr(self, attr, None)
            if moments:
                setattr(self, attr, {n: moments.get(n, np.zeros_like(self.model_arrays[n])) for n in names})

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Server optimiser state to checkpoint (FedAdam/FedYogi moments; empty for FedAvg/FedProx)."""
        out = {}
        for attr in ("m_t", "v_t"):
            for name, value in (getattr(self, attr, None) or {}).items():
                out[f"{attr}/{name}"] = value
        return out

    def load_state_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what `state_arrays` saved (resume)."""
        for attr in ("m_t", "v_t"):
            moments = {k.split("/", 1)[1]: np.array(v) for k, v in state.items() if k.startswith(f"{attr}/")}
            if moments and hasattr(self, attr):
                setattr(self, attr, moments)


class SliceFedAvg(SliceAggregation, FedAvg):
    """FedAvg over the named slice (the default)."""


class SliceFedProx(SliceAggregation, FedProx):
    """FedProx over the named slice; clients add (mu/2)·||w - w_global||² on the slice they train."""


class SliceFedAdam(SliceAggregation, FedAdam):
    """FedAdam (server-side Adam on the aggregated slice delta)."""


class SliceFedYogi(SliceAggregation, FedYogi):
    """FedYogi (server-side Yogi on the aggregated slice delta)."""


STRATEGIES: dict[str, type[SliceAggregation]] = {
    "fedavg": SliceFedAvg,
    "fedprox": SliceFedProx,
    "fedadam": SliceFedAdam,
    "fedyogi": SliceFedYogi,
}


def make_strategy(
    fed: FederatedConfig,
    model_arrays: Mapping[str, np.ndarray],
    slice_names: Mapping[int, Sequence[str]],
    round_offset: int = 0,
    seed: int = 0,
    client_dropout: float = 0.0,
) -> SliceAggregation:
    """Build the configured strategy (``federated.strategy``) around the server's full model."""
    kwargs: dict = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_nodes,
        min_evaluate_nodes=1 if fed.fraction_evaluate > 0 else 0,
        min_available_nodes=fed.min_available_nodes,
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy in ("fedadam", "fedyogi"):
        kwargs["eta"] = fed.server_learning_rate
    return STRATEGIES[fed.strategy](
        model_arrays=model_arrays,
        slice_names=slice_names,
        schedule=PhaseSchedule.from_config(fed),
        transfer_dtype=fed.transfer_dtype,
        round_offset=round_offset,
        seed=seed,
        client_dropout=client_dropout,
        **kwargs,
    )


def short_reason(reason: str | None) -> str:
    """The client's own error message out of the Ray traceback Flower wraps it in."""
    text = (reason or "unknown error").strip()
    _, found, message = text.rpartition("Message: ")
    if found:
        text = message
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error").removesuffix("'>")[:300]


def _metrics(content: RecordDict) -> MetricRecord:
    return next(iter(content.metric_records.values()), MetricRecord())


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    return array.astype(dtype) if np.issubdtype(array.dtype, np.floating) else array
