"""Partial aggregation by weight name on top of Flower's strategies, with the paper's two-phase schedule.

Only the trainable slice travels after a node first receives the model: phase 1 the head, phase 2 the head plus
the unfrozen top of the backbone. The round loop (`start`, Flower's with one exchange per round) replaces its
global arrays with whatever `aggregate_train` returns, so a strategy that aggregated just the slice would
shrink the global model to it.
`SliceAggregation` therefore keeps the full model itself, sends the slice, checks every reply, lets the Flower
strategy combine the slice updates (mean, median, trimmed mean, Krum, Bulyan, ...), merges the result back and
returns the full model. Weights are addressed by name, never by list position.

A node that lost the model (a restarted SuperNode keeps its node id, not its state) answers a slice with a
`NEEDS_FULL_MODEL` error; the strategy sends those nodes the full model through the round's Grid before it
aggregates, so a rejoining node takes part in the round it rejoined in.

LiteRT nodes (`dsl_fed.federated.litert_client`) train the head alone, with a trainable ``.tflite`` of the
current global model that the server exports (`trainable`, a `TrainableSource`) and ships in the message when
the node does not hold it yet. A node makes itself known as LiteRT by answering `NEEDS_TRAINABLE_MODEL`; from
then on it is sent the head and the model's sha256 (plus the bytes whenever the frozen part changed). In phase 2
the aggregation rule is per weight: **each head weight is combined over every valid reply, each unfrozen
backbone weight over the replies that carry it** (the Keras nodes'); a round without such a reply leaves the
backbone as it was. A phase-2 reply must carry the whole slice or exactly the head, nothing in between.

Differential privacy sits between the two: `DpMean` (`dsl_fed.federated.dp`, noise from OS entropy) wraps only
the combination rule (`_SliceRule`), so what it clips and noises is the update of the slice, and a server
optimiser (FedAdam, FedYogi) steps on the noised mean afterwards - its state never sees an un-noised aggregate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Result,
    Strategy,
)

from dsl_fed.availability import Trace
from dsl_fed.config import DpConfig, FederatedConfig
from dsl_fed.errors import DslFedError
from dsl_fed.federated.dp import DpMean
from dsl_fed.federated.online_clients import OnlineClients
from dsl_fed.federated.prompt_grid import exchange
from dsl_fed.federated.protocol import EVALUATE_FIRST, EVALUATION, NEEDS_FULL_MODEL, NEEDS_TRAINABLE_MODEL
from dsl_fed.federated.protocol import TRAINABLE_MODEL, TRAINABLE_SHA
from dsl_fed.federated.replies import ARRAYS, METRICS, NORM_BIT, check_evaluate_reply, check_train_reply, short_reason
from dsl_fed.federated.run_config import PROGRESS_MARK
from dsl_fed.robustness import dropped_clients

LOG = logging.getLogger("flwr").getChild("dsl_fed")  # Flower's handler streams it to `flwr run --stream`

SUMMED_METRICS = ("train-seconds", "work-seconds")  # per-client totals; the rest are example-weighted means
DROPPED_METRICS = ("partition-id", NORM_BIT)  # identify or describe one client, meaningless once averaged


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
    online: int | None = None  # connected nodes online in the availability trace (None: no trace, all may be sampled)
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
    clip_norm: float = 0.0  # differential privacy: the round's clipping norm (0 without DP)
    nodes: list[int] = field(default_factory=list)  # node ids sent a training message
    contributors: list[int] = field(default_factory=list)  # node ids whose update was aggregated
    evaluated: list[int] = field(default_factory=list)  # node ids whose evaluation reply was scored, in reply order
    head_only: int = 0  # aggregated phase-2 updates that carried the head alone (LiteRT nodes)

    def published(self, dp: bool) -> dict[str, Any]:
        """The stats as a round manifest records them; under DP without the clients' un-noised statistics."""
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if k not in CLIENT_STATISTICS} if dp else out


CLIENT_STATISTICS = ("num_examples", "client_seconds", "client_work_seconds", "train_metrics")
"""RoundStats fields computed from what clients report about their data and work: never published under DP,
where only the noised model is covered by epsilon."""


def aggregate_client_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean of the clients' scalar metrics over the clients that report each; totals for
    examples and training seconds."""
    weights = [float(_metrics(r)[weighted_by_key]) for r in records]
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for record, weight in zip(records, weights, strict=True):
        for key, value in _metrics(record).items():
            if key == weighted_by_key or key in DROPPED_METRICS or isinstance(value, list):
                continue
            summed = key in SUMMED_METRICS
            sums[key] = sums.get(key, 0.0) + float(value) * (1.0 if summed else weight)
            totals[key] = totals.get(key, 0.0) + weight
    out = MetricRecord({weighted_by_key: int(sum(weights))})
    for key, value in sums.items():
        out[key] = value if key in SUMMED_METRICS else value / totals[key]
    return out


class SliceAggregation:
    """Mixin (put it before a Flower strategy class) for partial aggregation of a named weight slice.

    With LiteRT nodes (head-only replies in phase 2), each head weight is combined over every valid reply and
    each unfrozen backbone weight over the replies that carry it (`_aggregate_by_weight`).

    Args:
        model_arrays: The full model, weight name -> array (the server's master copy, float32).
        slice_names: Phase -> names of the weights trained (and exchanged) in that phase; phase 1's names must
            be a subset of phase 2's, so weights outside the current slice are the same everywhere.
        schedule: Phase of each round.
        transfer_dtype: ``float32`` or ``float16`` (halves the bytes; the server still aggregates in float32).
        round_offset: Rounds already completed (resume): Flower counts from 1 again, the schedule does not.
        seed: Seeds node sampling per round, so a resumed run samples like an uninterrupted one.
        client_dropout: Share of the sampled clients that drop out of each round (seeded by `seed` and round).
        dp: Differential privacy of the slice update (``federated.dp``); None or mode ``none``: off.
        num_nodes: Nodes in the federation (needed with DP: the noise is calibrated to the sample size).
        node_wait: Seconds a round waits for ``min_available_nodes`` before it goes on with fewer (see
            `_connected_nodes`).
        trainable: ``(full weights, phase) -> (sha256, .tflite bytes)``, the trainable model for LiteRT nodes
            (`TrainableSource`); None: a node that asks for one fails.
        availability: ``federated.availability``: only nodes whose client is online in the round are sampled
            (`_online_nodes`); None: every connected node may be.
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
        dp: DpConfig | None = None,
        num_nodes: int | None = None,
        node_wait: float = 120.0,
        trainable: Callable[[Mapping[str, np.ndarray], int], tuple[str, bytes]] | None = None,
        availability: Trace | None = None,
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
        self.state_after: dict[int, dict[str, np.ndarray]] = {}  # `state_arrays` after rounds not yet published
        self._nodes_with_model: set[int] = set()  # nodes known to hold the full model in their node state
        self.dp = dp if dp is not None and dp.enabled else None
        self._rule: Strategy = _SliceRule(self)
        if self.dp is not None:
            if num_nodes is None:
                raise ValueError("differential privacy needs num_nodes (the noise depends on the sample size)")
            self._rule = dp_wrapper(self._rule, self.dp, self.sample_size(num_nodes, self.fraction_train,
                                                                          self.min_train_nodes))
        self.node_wait = node_wait
        self._sent: list[Message] = []  # this exchange's messages: a reply is matched to the node it was sent to
        self._grid: Grid | None = None  # the round's Grid, to send the full model to nodes that lost it
        self._timeout = 3600.0  # how long `start` waits for replies
        self._evaluate_parts: tuple[str, ...] = ("devel",)  # what an evaluation reply must carry (its config says)
        self._num_classes: int | None = None
        self.trainable = trainable
        self._litert_nodes: dict[int, str | None] = {}  # LiteRT node -> sha256 of the trainable model it holds
        self.online_clients = OnlineClients(availability, self.configrecord_key) if availability is not None else None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's round loop (train, evaluate on the nodes, `evaluate_fn`) with one message per node and round.

        Round r's evaluation and round r+1's training carry the same global model, so on a Grid whose nodes answer
        in order (`PromptGrid.in_order`: a deployment) they go out as one exchange, and a Keras node sampled for
        both gets one training message that asks it to score the model first (`EVALUATE_FIRST`). Every message
        costs a SuperNode seconds: it sleeps 3 s after any pull that finds nothing (Flower 1.42, so after each
        reply while the server waits for the slowest node), pulls the content, polls for the reply every 0.5 s
        and pushes it. Round r's `evaluate_fn` (scoring, checkpoint, publishing) runs right after the next exchange
        goes out, while the nodes wait for it or work on it; the checkpoint keeps the server state as it was
        after round r (`state_after`). Otherwise (the simulation, or no evaluation messages because the server
        scores the model itself) the steps follow each other as in Flower's loop.
        """
        self._timeout = timeout  # also for messages sent again within a round
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()

        def evaluated(rnd: int, arrays: ArrayRecord, replies: list[Message]) -> Callable[[], None]:
            """Aggregate round `rnd`'s evaluation now (the server's model must still be that round's); returns its
            publishing, `evaluate_fn`, to run later."""
            if (metrics := self.aggregate_evaluate(rnd, replies)) is not None:
                result.evaluate_metrics_clientapp[rnd] = metrics

            def publish() -> None:
                if evaluate_fn is not None and (scores := evaluate_fn(rnd, arrays)) is not None:
                    result.evaluate_metrics_serverapp[rnd] = scores
                self.state_after.pop(rnd + self.round_offset, None)
            return publish

        if evaluate_fn is not None and (scores := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = scores
        together = getattr(grid, "in_order", False)
        publish: Callable[[], None] | None = None  # a round whose evaluation is in and whose outputs are not out yet
        arrays = initial_arrays
        for rnd in range(1, num_rounds + 2):
            self._sent = []
            evaluate = list(self.configure_evaluate(rnd - 1, arrays, evaluate_config, grid)) if rnd > 1 else []
            if rnd > 1 and not (together and evaluate and rnd <= num_rounds):
                replies = exchange(grid, evaluate, timeout, publish)
                publish, evaluate = None, []
                evaluated(rnd - 1, arrays, replies)()
            if rnd > num_rounds:
                break
            train = list(self.configure_train(rnd, arrays, train_config, grid))
            combined = bool(evaluate)  # round rnd - 1's evaluation goes out with this round's training
            if combined:
                evaluate = self._fold_evaluation(evaluate, train, self._round_stats(rnd - 1 + self.round_offset))
            replies = exchange(grid, evaluate + train, timeout, publish)
            publish = None
            if combined:
                replies, evaluations = self._split_evaluations(replies, self._round_stats(rnd + self.round_offset))
                publish = evaluated(rnd - 1, arrays, evaluations)
            new_arrays, metrics = self.aggregate_train(rnd, replies)
            self.state_after[rnd + self.round_offset] = self.state_arrays()  # its checkpoint's: written later
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
        return result

    def _fold_evaluation(self, evaluate: list[Message], train: list[Message], stats: RoundStats) -> list[Message]:
        """The evaluation messages still to send once every Keras node sampled for training is asked to score
        the model in its training message (`EVALUATE_FIRST`); `stats` (the evaluated round's) stops counting
        the bytes of the messages dropped. A node whose evaluation message brings it the full model keeps both
        (its training message then holds only the slice)."""
        first_contact = {m.metadata.dst_node_id for m in evaluate if m.content[self.configrecord_key].get("full-model")}
        training = {m.metadata.dst_node_id for m in train} - set(self._litert_nodes) - first_contact
        folded: dict[int, RecordDict] = {}  # by id of the content the training messages share
        for msg in train:
            if msg.metadata.dst_node_id in training:
                content = msg.content
                if id(content) not in folded:
                    config = ConfigRecord({**dict(content[self.configrecord_key]), EVALUATE_FIRST: True})
                    folded[id(content)] = RecordDict({self.arrayrecord_key: content[self.arrayrecord_key],
                                                      self.configrecord_key: config})
                msg.content = folded[id(content)]
        kept = []
        for msg in evaluate:
            if msg.metadata.dst_node_id in training:
                stats.bytes_down -= _payload_bytes(msg)
            else:
                kept.append(msg)
        return kept

    def _split_evaluations(self, replies: list[Message], stats: RoundStats) -> tuple[list[Message], list[Message]]:
        """(training replies, evaluation replies) of an exchange: nodes that asked for the full model get it first
        (`_with_full_model_resent`), and an `EVALUATE_FIRST` reply gives both, its `EVALUATION` record becoming
        an evaluation reply of the same node (no record: none; a bad one is refused by `aggregate_evaluate`)."""
        train, evaluations = [], []
        for reply in self._with_full_model_resent(replies, stats):
            asked = self._asked(reply)
            if asked is None or asked.metadata.message_type != MessageType.TRAIN:
                evaluations.append(reply)
                continue
            train.append(reply)
            if (EVALUATE_FIRST in asked.content[self.configrecord_key] and not reply.has_error()
                    and EVALUATION in reply.content):
                metrics = reply.content[EVALUATION]
                del reply.content[EVALUATION]
                evaluations.append(Message(RecordDict({METRICS: metrics}), reply_to=asked))
        return train, evaluations

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
        self._grid = grid
        self._align_optimizer_state(names)
        config["phase"] = phase
        config["transfer-dtype"] = self.transfer_dtype
        if self.dp is not None:
            config["dp-clipping"] = self.dp.clipping  # tells the node's clipping mod which Flower mod to run
        # The DP wrapper (if any) and FedOpt remember these arrays as the round's start: the float32 slice.
        messages = list(self._rule.configure_train(rnd, self._record(names, "float32"), config, grid))
        stats.sampled = len(messages)
        if self.client_dropout > 0:
            dropped = set(dropped_clients(len(messages), self.client_dropout, self.seed, rnd).tolist())
            messages = [m for i, m in enumerate(messages) if i not in dropped]
            stats.dropped = len(dropped)
        stats.clip_norm = float(getattr(self._rule, "clipping_norm", 0.0))
        stats.nodes = [m.metadata.dst_node_id for m in messages]
        return self._address(messages, names, config, stats, phase)

    def _round_stats(self, rnd: int) -> RoundStats:
        """Round `rnd`'s stats, made here if its training did not make them (e.g. evaluation after a resume)."""
        return self.rounds.setdefault(rnd, RoundStats(round=rnd, phase=self.schedule.phase(rnd)))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages carry the same slice as training (clients already hold the rest)."""
        rnd = server_round + self.round_offset
        names = self.slice_names[self.schedule.phase(rnd)]
        config["transfer-dtype"] = self.transfer_dtype
        self._grid = grid
        self._evaluate_parts = ("devel", "test") if bool(config.get("evaluate-test", False)) else ("devel",)
        self._num_classes = len(config["classes"]) if isinstance(config.get("classes"), list) else None
        stats = self._round_stats(rnd)
        messages = self._sample_messages(rnd, ArrayRecord(), config, grid, MessageType.EVALUATE)
        return self._address(messages, names, config, stats, self.schedule.phase(rnd))

    @staticmethod
    def sample_size(num_nodes: int, fraction: float, minimum: int) -> int:
        """How many nodes a round samples (Flower's rule: the fraction, rounded down, at least `minimum`)."""
        return max(int(num_nodes * fraction), minimum)

    def _sample_messages(self, rnd: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                         message_type: str) -> list[Message]:
        """Flower's node sampling, with a generator of its own seeded per round (the global `random` is left alone).

        A resumed run therefore samples exactly like an uninterrupted one. With an availability trace the
        candidates are the online nodes only (the fraction of those, at least the minimum); a round with fewer
        online nodes than the minimum samples nobody (training: the global model stays as it was).
        """
        train = message_type == MessageType.TRAIN
        fraction = self.fraction_train if train else self.fraction_evaluate
        if fraction == 0.0:
            return []
        minimum = self.min_train_nodes if train else self.min_evaluate_nodes
        nodes = self._connected_nodes(grid, rnd, max(self.min_available_nodes, minimum), minimum, message_type)
        if self.online_clients is not None:
            nodes = self.online_clients.online(grid, rnd, nodes, self._timeout)
            self._round_stats(rnd).online = len(nodes)
            if len(nodes) < max(minimum, 1):
                LOG.warning("%s round %d: %d node(s) online, fewer than the %d its %s needs; nobody is sampled%s",
                            PROGRESS_MARK, rnd, len(nodes), max(minimum, 1), message_type,
                            " and the global model stays as it was" if train else "")
                return []
        size = min(self.sample_size(len(nodes), fraction, minimum), len(nodes))
        sampled = random.Random(f"{message_type}-{self.seed}-{rnd}").sample(nodes, size)
        config["server-round"] = rnd
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, sampled, message_type))

    def _connected_nodes(self, grid: Grid, rnd: int, wanted: int, minimum: int, message_type: str) -> list[int]:
        """The connected node ids, once `wanted` are connected or `node_wait` seconds have passed.

        Flower's own sampling waits for ``min_available_nodes`` forever, so one dead SuperNode would stall the
        run. After `node_wait` the round goes on with the nodes there are (and later rounds stop waiting for
        the missing ones) if they are at least `minimum`; with fewer the run fails, saying so.
        """
        deadline = time.monotonic() + self.node_wait
        seen = -1
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            if time.monotonic() >= deadline:
                if len(nodes) < max(minimum, 1):
                    raise DslFedError(
                        f"round {rnd}: only {len(nodes)} node(s) connected after waiting {self.node_wait:.0f} s, "
                        f"but its {message_type} needs at least {max(minimum, 1)}")
                LOG.warning("%s round %d: %d node(s) connected after waiting %.0f s for min_available_nodes=%d; "
                            "going on with them, later rounds do not wait for the others", PROGRESS_MARK, rnd,
                            len(nodes), self.node_wait, self.min_available_nodes)
                self.min_available_nodes = len(nodes)
                return nodes
            if len(nodes) != seen:
                LOG.info("round %d: waiting for nodes to connect: %d connected, %d wanted", rnd, len(nodes), wanted)
                seen = len(nodes)
            time.sleep(1)
        return nodes

    def _address(self, messages: list[Message], names: list[str], config: ConfigRecord, stats: RoundStats,
                 phase: int) -> list[Message]:
        """Give each message its payload: the full model (float32, once per node), the slice, or (LiteRT node) the
        head with the trainable model's sha256 and, when the node does not hold it, its bytes."""
        payloads: dict[bool, tuple[RecordDict, int]] = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self._litert_nodes:
                msg.content, size = self._litert_content(node, config, phase)
                stats.bytes_down += size
                continue
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
        self._sent.extend(messages)
        return messages

    def _litert_content(self, node: int, config: ConfigRecord, phase: int) -> tuple[RecordDict, int]:
        """A LiteRT node's payload (the head, the trainable model's sha256, its bytes if the node lacks them) and size."""
        sha, model = self.trainable(self.model_arrays, phase)
        extra: dict[str, Any] = {TRAINABLE_SHA: sha, "full-model": False}
        if self._litert_nodes.get(node) != sha:
            extra[TRAINABLE_MODEL] = model
        self._litert_nodes[node] = sha  # reset when the node's reply is an error
        arrays = self._record(self.slice_names[1], self.transfer_dtype)
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({**dict(config), **extra})})
        return content, arrays.count_bytes() + (len(model) if TRAINABLE_MODEL in extra else 0)

    def node_of(self, reply: Message) -> int:
        """The node a reply answers for: Flower's error reply for a lost node comes from the SuperLink's id."""
        asked = self._asked(reply)
        return asked.metadata.dst_node_id if asked is not None else reply.metadata.src_node_id

    def _asked(self, reply: Message) -> Message | None:
        """The message of this round that `reply` answers."""
        asked = reply.metadata.reply_to_message_id
        return next((m for m in self._sent if asked and m.metadata.message_id == asked), None)

    def _with_full_model_resent(self, replies: Iterable[Message], stats: RoundStats) -> list[Message]:
        """`replies`, where a node asked for the full model (or a LiteRT node for the trainable model) replaced by
        its answer to the message sent again with it.

        The node gets the message it asked about again, same config, with the whole model in float32 (as on
        its first message), or - LiteRT - the head and the trainable model's bytes, through the round's Grid;
        the round waits for it before anything is aggregated.
        """
        replies = list(replies)
        codes = (NEEDS_FULL_MODEL,) + ((NEEDS_TRAINABLE_MODEL,) if self.trainable is not None else ())
        asking = [r for r in replies if r.has_error() and r.error.code in codes and self._asked(r)]
        if not asking or self._grid is None:
            return replies
        full = self._record(list(self.model_arrays), "float32")
        again = []
        for reply in asking:
            asked = self._asked(reply)
            node = asked.metadata.dst_node_id
            if reply.error.code == NEEDS_TRAINABLE_MODEL:
                self._nodes_with_model.discard(node)
                self._litert_nodes[node] = None
                config = asked.content[self.configrecord_key]
                content, size = self._litert_content(node, config, self.schedule.phase(int(config["server-round"])))
                what = "runs LiteRT without this round's trainable model; sent it"
            else:
                self._litert_nodes.pop(node, None)
                config = ConfigRecord({**dict(asked.content[self.configrecord_key]), "full-model": True})
                content = RecordDict({self.arrayrecord_key: full, self.configrecord_key: config})
                size, what = full.count_bytes(), "holds no model (restarted); sent it the full model"
            again.append(Message(content, dst_node_id=node, message_type=asked.metadata.message_type))
            stats.bytes_down += size
            LOG.info("%s round %d: node %d %s", PROGRESS_MARK, stats.round, node, what)
        answers = list(self._grid.send_and_receive(again, timeout=self._timeout))
        self._sent.extend(again)
        return [r for r in replies if not any(r is a for a in asking)] + answers

    def _record(self, names: Sequence[str], dtype: str) -> ArrayRecord:
        return ArrayRecord({n: Array(_cast(self.model_arrays[n], dtype)) for n in names})

    # ----------------------------------------------------------------------------------------- receiving

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed and invalid replies, aggregate the slice, merge it into the full model and return that.

        Every reply is untrusted (`dsl_fed.federated.replies`): a malformed one is logged against its node and
        left out, never raised on. The rule sees only the validated slice (float32, the server's order) and the
        weight, so Flower's consistency checks cannot fail; client statistics come from the validated metrics.
        """
        rnd = server_round + self.round_offset
        stats = self.rounds[rnd]
        names = self.slice_names[stats.phase]
        valid: list[tuple[Message, MetricRecord]] = []
        for msg in self._with_full_model_resent(replies, stats):
            node = self.node_of(msg)
            if msg.has_error():
                self._nodes_with_model.discard(node)
                if node in self._litert_nodes:
                    self._litert_nodes[node] = None  # it may have lost the trainable model too
                reason = short_reason(msg.error.reason)
                stats.failed.append(f"node {node}: {reason}")
                LOG.warning("%s round %d: node %d failed and is left out: %s", PROGRESS_MARK, rnd, node, reason)
                continue
            stats.bytes_up += _payload_bytes(msg)
            sent = self._reply_names(msg.content, stats.phase, node)
            problem = self._check_update(msg.content, sent)
            if problem is None and any(self.node_of(m) == node for m, _ in valid):
                problem = "a second reply in the same round"
            if problem:
                pid = _metrics(msg.content).get("partition-id")  # named only if it is a valid id
                who = f"node {node}" + (f" (partition {pid})" if type(pid) is int else "")
                stats.rejected.append(f"{who}: {problem}")
                LOG.warning("%s round %d: rejected the update of %s: %s", PROGRESS_MARK, rnd, who, problem)
                continue
            metrics = MetricRecord(dict(msg.content[METRICS]))
            msg.content = self._as_float32(msg.content, sent)
            valid.append((msg, metrics))
        # A fixed order makes the float sums, and so a resumed run, reproducible.
        valid.sort(key=lambda pair: (pair[1]["partition-id"], pair[0].metadata.src_node_id))
        if len(valid) < max(self.min_train_nodes, 1):
            if stats.sampled == 0 and stats.online is not None:
                return None, None  # too few online clients: `_sample_messages` said so
            LOG.warning(
                "%s round %d: %d valid update(s), fewer than min_train_nodes=%d; the global model is unchanged",
                PROGRESS_MARK, rnd, len(valid), self.min_train_nodes,
            )
            return None, None
        if self.dp is not None:
            # The noise is calibrated to the *plain* mean of clipped updates (one client moves it by at most
            # clip_norm / n); an example-weighted mean would let a large client move it further.
            for msg, _ in valid:
                msg.content[METRICS][self.weighted_by_key] = 1
        head_only = sum(len(msg.content[ARRAYS]) < len(names) for msg, _ in valid)
        aggregated = self._aggregate_by_weight(rnd, [msg for msg, _ in valid], names)
        if aggregated is None:
            return None, None
        aggregated = self._server_step(aggregated)
        for name, array in aggregated.items():
            self.model_arrays[name] = array.numpy().astype(self.model_arrays[name].dtype)
        stats.aggregated = len(valid)
        stats.head_only = head_only
        stats.contributors = [self.node_of(m) for m, _ in valid]
        stats.updated = True
        if self.dp is not None:
            return self.full_record(), None  # client statistics are neither kept nor logged: only the model is noised
        reported = [metrics for _, metrics in valid]
        stats.num_examples = int(sum(m[self.weighted_by_key] for m in reported))
        stats.client_seconds = float(sum(float(m.get("train-seconds", 0.0)) for m in reported))
        stats.client_work_seconds = float(sum(float(m.get("work-seconds", 0.0)) for m in reported))
        metrics = aggregate_client_metrics([RecordDict({METRICS: m}) for m in reported], self.weighted_by_key)
        stats.train_metrics = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
        return self.full_record(), metrics

    def _reply_names(self, content: RecordDict, phase: int, node: int) -> list[str]:
        """The weights a reply must carry: the phase's slice, or in phase 2 the head alone if that is what a
        LiteRT node (one sent the trainable model) carries; never under DP, whose noise is sized for the whole
        slice. A Keras node's head-only reply is refused: it would leave the backbone to the other nodes."""
        names = self.slice_names[phase]
        if phase == 2 and self.dp is None and node in self._litert_nodes:
            try:
                if set(content[ARRAYS].keys()) == set(self.slice_names[1]):
                    return list(self.slice_names[1])
            except Exception:  # noqa: BLE001 - an unreadable reply is refused by the check that follows
                pass
        return names

    def _aggregate_by_weight(self, rnd: int, replies: list[Message], names: list[str]) -> ArrayRecord | None:
        """Each weight combined over the replies that carry it: the rule once when all carry the whole slice, else
        once for the head (every reply) and once for the rest of the slice (the replies with the whole slice)."""
        whole = [msg for msg in replies if len(msg.content[ARRAYS]) == len(names)]
        if len(whole) == len(replies):
            return self._rule.aggregate_train(rnd, replies)[0]
        head = self.slice_names[1]
        rest = [name for name in names if name not in head]
        contents = {id(msg): msg.content for msg in replies}
        merged: dict[str, Array] = {}
        for group, group_names in ((replies, head), (whole, rest)):
            if not group:
                LOG.info("%s round %d: no reply carries the unfrozen backbone weights; they stay as they were",
                         PROGRESS_MARK, rnd)
                continue
            for msg in group:
                content = contents[id(msg)]
                msg.content = RecordDict({ARRAYS: ArrayRecord({n: content[ARRAYS][n] for n in group_names}),
                                          METRICS: content[METRICS]})
            aggregated, _ = self._rule.aggregate_train(rnd, group)
            if aggregated is None:
                return None
            merged.update(aggregated.items())
        return ArrayRecord(merged)

    def _combine(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The Flower strategy's rule for combining the slice updates (what a DP wrapper wraps)."""
        return super().aggregate_train(server_round, replies)

    def _server_step(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Server optimiser step on the combined (and, with DP, noised) slice; none for plain averaging."""
        return aggregated

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate client-side evaluation over the clients that had held-out clips and sent a valid reply."""
        rnd = server_round + self.round_offset
        stats = self._round_stats(rnd)
        valid: list[Message] = []
        for msg in self._with_full_model_resent(replies, stats):
            node = self.node_of(msg)
            if msg.has_error():
                self._nodes_with_model.discard(node)
                LOG.warning("%s round %d: evaluation on node %d failed: %s", PROGRESS_MARK, rnd, node,
                            short_reason(msg.error.reason))
                continue
            problem = check_evaluate_reply(msg.content, self._evaluate_parts, self._num_classes)
            if problem is None and any(self.node_of(m) == node for m in valid):
                problem = "a second reply in the same round"
            if problem:
                LOG.warning("%s round %d: rejected the evaluation of node %d: %s", PROGRESS_MARK, rnd, node, problem)
            elif msg.content[METRICS][self.weighted_by_key] > 0:
                valid.append(msg)
        stats.evaluated = [self.node_of(m) for m in valid]  # the order the aggregation function gets them in
        return super().aggregate_evaluate(rnd, valid) if valid else None

    def _check_update(self, content: RecordDict, names: list[str]) -> str | None:
        """Why a client's update must not be aggregated, or None if it is fine."""
        adaptive_client = self.dp is not None and self.dp.mode == "client" and self.dp.clipping == "adaptive"
        problem = check_train_reply(content, {n: self.model_arrays[n].shape for n in names},
                                    {"float32", self.transfer_dtype}, norm_bit=adaptive_client)
        if problem is None and self.dp is not None:
            return self._check_dp_update(content[ARRAYS], names)
        return problem

    def _check_dp_update(self, arrays: ArrayRecord, names: list[str]) -> str | None:
        """What DP cannot take: a zero update (clipping divides by its norm), and in client mode an update the
        node did not clip (the noise would not cover it)."""
        norm = float(np.sqrt(sum(np.sum((arrays[n].numpy().astype(np.float64) - self.model_arrays[n]) ** 2)
                                 for n in names)))
        if norm == 0:
            return "the update is exactly zero (Flower's clipping divides by the update's norm)"
        if self.dp.mode == "client":
            bound = float(self._rule.clipping_norm)
            if norm > bound * 1.01:  # 1 %: float16 transfer rounding; the norm itself is not logged (un-noised)
                return "update norm above the clipping norm: the node did not clip it"
        return None

    @staticmethod
    def _as_float32(content: RecordDict, names: list[str]) -> RecordDict:
        """Aggregate in float32 even when the update travelled as float16, in the slice's (the server's) order.

        The metrics keep only what the rule reads, so Flower's checks see the same keys in every reply.
        """
        arrays, metrics = content[ARRAYS], content[METRICS]
        float32 = ArrayRecord({n: Array(arrays[n].numpy().astype(np.float32)) for n in names})
        kept = {k: metrics[k] for k in ("num-examples", NORM_BIT) if k in metrics}  # what the rule reads
        return RecordDict({ARRAYS: float32, METRICS: MetricRecord(kept)})

    # ----------------------------------------------------------------------------------------- state

    def full_record(self) -> ArrayRecord:
        """The server's full model as an ArrayRecord (what `start` hands to `evaluate_fn`)."""
        return ArrayRecord({n: Array(a) for n, a in self.model_arrays.items()})

    def _align_optimizer_state(self, names: list[str]) -> None:
        """Server optimiser state per weight: a phase change adds weights whose state starts empty."""

    @property
    def dp_releases(self) -> int:
        """Noised means released so far under ``federated.dp`` (what epsilon composes); 0 without DP."""
        return self._rule.releases if self.dp is not None else 0

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Server state to checkpoint: optimiser moments, DP releases and adaptive clipping norm (may be empty)."""
        out = {f"{attr}/{name}": value for attr in self._STATE for name, value in (getattr(self, attr, None) or {}).items()}
        if self.dp is not None:
            out["dp/releases"] = np.int64(self._rule.releases)
        if self.dp is not None and self.dp.clipping == "adaptive":
            out["dp/clip_norm"] = np.float64(self._rule.clipping_norm)
        return out

    def load_state_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what `state_arrays` saved (resume)."""
        for attr in self._STATE:
            values = {k.split("/", 1)[1]: np.array(v) for k, v in state.items() if k.startswith(f"{attr}/")}
            if values:
                setattr(self, attr, values)
        if self.dp is not None:
            # a checkpoint from before releases were counted: every earlier round counts (an upper bound)
            self._rule.releases = int(state.get("dp/releases", self.round_offset))
        if "dp/clip_norm" in state and self.dp is not None:
            self._rule.clipping_norm = float(state["dp/clip_norm"])

    _STATE: tuple[str, ...] = ()  # names of per-weight optimiser dicts kept in `state_arrays`


class _SliceRule(Strategy):
    """A SliceAggregation's node sampling and combination rule as a Strategy object of its own.

    `DpMean` wraps a Strategy; wrapping this one puts clipping and noise exactly around the combination of
    slice updates - inside the slice bookkeeping, before any server optimiser step.
    """

    def __init__(self, owner: SliceAggregation) -> None:
        self.owner = owner

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.owner._sample_messages(server_round, arrays, config, grid, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.owner._combine(server_round, list(replies))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.owner._sample_messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.owner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Nothing to add: `start` logs the owner's summary."""


def dp_wrapper(rule: Strategy, dp: DpConfig, num_sampled: int) -> Strategy:
    """``federated.dp`` around a slice rule: clipping and noise drawn from OS entropy (`DpMean`)."""
    return DpMean(rule, dp, num_sampled)


class SliceFedAvg(SliceAggregation, FedAvg):
    """FedAvg over the named slice (the default)."""


class SliceFedProx(SliceAggregation, FedProx):
    """FedProx over the named slice; clients add (mu/2)·||w - w_global||² on the slice they train."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["proximal-mu"] = self.proximal_mu  # what FedProx.configure_train adds; the sampling is ours
        return super().configure_train(server_round, arrays, config, grid)


class _ServerAdaptive(SliceAggregation):
    """FedAdam/FedYogi as a step on the mean slice update, with moments kept per weight name.

    The mean comes from FedAvg (through the DP wrapper, if any) and the step follows. Weights that join the
    slice in phase 2 start their moments - and FedAdam its bias correction - at their own first step.
    """

    _STATE = ("m_t", "v_t", "steps")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.m_t: dict[str, np.ndarray] = {}
        self.v_t: dict[str, np.ndarray] = {}
        self.steps: dict[str, np.ndarray] = {}  # per weight: server steps taken so far

    def _combine(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return FedAvg.aggregate_train(self, server_round, replies)

    def _server_step(self, aggregated: ArrayRecord) -> ArrayRecord:
        return _step_each(self.model_arrays, aggregated, self._adaptive_step)

    def _adaptive_step(self, name: str, delta: np.ndarray) -> np.ndarray:
        m = self.m_t.get(name, np.zeros_like(delta))
        v = self.v_t.get(name, np.zeros_like(delta))
        t = int(self.steps.get(name, 0)) + 1
        self.m_t[name] = m = self.beta_1 * m + (1 - self.beta_1) * delta
        self.v_t[name] = v = self._second_moment(v, delta)
        self.steps[name] = np.int64(t)
        return self._step_size(t) * m / (np.sqrt(v) + self.tau)

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _step_size(self, t: int) -> float:
        return self.eta

    def _align_optimizer_state(self, names: list[str]) -> None:
        for attr in self._STATE:
            setattr(self, attr, {n: v for n, v in getattr(self, attr).items() if n in names})


class SliceFedAdam(_ServerAdaptive, FedAdam):
    """FedAdam (Reddi et al., 2021): Adam on the mean slice delta, bias-corrected per weight (Kingma & Ba)."""

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * delta**2

    def _step_size(self, t: int) -> float:
        return self.eta * np.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)


class SliceFedYogi(_ServerAdaptive, FedYogi):
    """FedYogi (Reddi et al., 2021): like FedAdam with Yogi's additive second moment and no bias correction."""

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta_2) * delta**2 * np.sign(v - delta**2)


class SliceFedAvgM(SliceAggregation, FedAvgM):
    """FedAvgM (Hsu et al., 2019): server momentum on the mean slice update, kept per weight name.

    Like FedAdam/FedYogi the step follows the mean (and, with DP, its noise), so DP composes with it: the
    momentum only post-processes noised means. Flower's FedAvgM keeps momentum as a list by array position,
    which the phase change reorders; here a weight that joins in phase 2 starts with zero momentum.
    """

    _STATE = ("momentum",)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.momentum: dict[str, np.ndarray] = {}

    def _combine(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return FedAvg.aggregate_train(self, server_round, replies)

    def _server_step(self, aggregated: ArrayRecord) -> ArrayRecord:
        return _step_each(self.model_arrays, aggregated, self._momentum_step)

    def _momentum_step(self, name: str, delta: np.ndarray) -> np.ndarray:
        self.momentum[name] = v = self.server_momentum * self.momentum.get(name, 0.0) + delta
        return self.server_learning_rate * v


class SliceFedMedian(SliceAggregation, FedMedian):
    """Coordinate-wise median of the slice updates."""


class SliceFedTrimmedAvg(SliceAggregation, FedTrimmedAvg):
    """Coordinate-wise mean after cutting the `beta` share of largest and smallest values."""


class _RankOnUpdates(SliceAggregation):
    """The distance-based rules (Krum, MultiKrum, Bulyan) see float64 updates, every reply weighing the same.

    Flower ranks replies by ``||x||² + ||y||² - 2x·y`` on whatever arrays it gets. On float32 absolute weights the
    rounding error of that formula (about 1e-7 of ``||x||²``) exceeds the distances between small updates, and
    Krum picks the wrong client. So the rule gets each update (reply minus the global slice) in float64, and the
    global slice is added back to its result. Its mean is unweighted, as in the papers: a client-reported example
    count must not buy an attacker influence.
    """

    def _combine(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        base = {name: array.astype(np.float64) for name, array in self.model_arrays.items()}
        for msg in replies:
            (array_key, arrays), (metric_key, metrics) = *msg.content.array_records.items(), *msg.content.metric_records.items()
            update = ArrayRecord({n: Array(a.numpy().astype(np.float64) - base[n]) for n, a in arrays.items()})
            msg.content = RecordDict({array_key: update, metric_key: MetricRecord({**dict(metrics), self.weighted_by_key: 1})})
        aggregated, metrics = super()._combine(server_round, replies)
        if aggregated is None:
            return None, None
        return ArrayRecord({n: Array(base[n] + a.numpy().astype(np.float64)) for n, a in aggregated.items()}), metrics


class SliceKrum(_RankOnUpdates, Krum):
    """Krum (Blanchard et al., 2017): the one update closest to its n - f - 2 nearest neighbours."""


class SliceMultiKrum(_RankOnUpdates, MultiKrum):
    """MultiKrum (Blanchard et al., 2017): the plain (unweighted) mean of the n - f updates with the best Krum
    scores."""

    def _combine(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        return super()._combine(server_round, replies)


class SliceBulyan(_RankOnUpdates, Bulyan):
    """Bulyan: Krum selection, then a coordinate-wise trimmed mean around the median (needs n >= 4f + 3)."""


STRATEGIES: dict[str, type[SliceAggregation]] = {
    "fedavg": SliceFedAvg,
    "fedprox": SliceFedProx,
    "fedadam": SliceFedAdam,
    "fedyogi": SliceFedYogi,
    "fedavgm": SliceFedAvgM,
    "fedmedian": SliceFedMedian,
    "fedtrimmedavg": SliceFedTrimmedAvg,
    "krum": SliceKrum,
    "multikrum": SliceMultiKrum,
    "bulyan": SliceBulyan,
}
MIN_NODES = {"krum": lambda f: 2 * f + 3, "multikrum": lambda f: 2 * f + 3, "bulyan": lambda f: 4 * f + 3}


def make_strategy(
    fed: FederatedConfig,
    model_arrays: Mapping[str, np.ndarray],
    slice_names: Mapping[int, Sequence[str]],
    num_nodes: int,
    round_offset: int = 0,
    seed: int = 0,
    client_dropout: float = 0.0,
    node_wait: float = 120.0,
    trainable: Callable[[Mapping[str, np.ndarray], int], tuple[str, bytes]] | None = None,
    availability: Trace | None = None,
) -> SliceAggregation:
    """Build the configured strategy (``federated.strategy``, ``federated.dp``) around the server's full model.

    Raises:
        DslFedError: the federation is too small for the robust strategy's ``federated.num_malicious``.
    """
    sampled = fed.clients_per_round(num_nodes)
    if fed.strategy in MIN_NODES and sampled < MIN_NODES[fed.strategy](fed.num_malicious):
        raise DslFedError(
            f"federated.num_malicious: {fed.strategy} tolerates {fed.num_malicious} attacker(s) only with at least "
            f"{MIN_NODES[fed.strategy](fed.num_malicious)} clients per round, but a round samples {sampled}"
        )
    if fed.strategy == "fedtrimmedavg" and int(fed.trim_fraction * sampled) < 1:
        need = min_clients_to_trim(fed.trim_fraction)
        raise DslFedError(
            f"federated.trim_fraction: {fed.trim_fraction:g} of {sampled} clients per round trims nothing (a plain "
            f"mean); fedtrimmedavg needs at least {need} clients per round at this fraction"
            if need else "federated.trim_fraction: 0 trims nothing (a plain mean); use federated.strategy fedavg"
        )
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
        kwargs.update(eta=fed.server_learning_rate, beta_2=fed.server_beta_2, tau=fed.server_tau)
    elif fed.strategy == "fedavgm":
        kwargs["server_momentum"] = fed.server_momentum
    elif fed.strategy == "fedtrimmedavg":
        kwargs["beta"] = fed.trim_fraction
    elif fed.strategy in MIN_NODES:
        kwargs["num_malicious_nodes"] = fed.num_malicious
    return STRATEGIES[fed.strategy](
        model_arrays=model_arrays,
        slice_names=slice_names,
        schedule=PhaseSchedule.from_config(fed),
        transfer_dtype=fed.transfer_dtype,
        round_offset=round_offset,
        seed=seed,
        client_dropout=client_dropout,
        dp=fed.dp,
        num_nodes=num_nodes,
        node_wait=node_wait,
        trainable=trainable,
        availability=availability,
        **kwargs,
    )


def min_clients_to_trim(fraction: float) -> int | None:
    """Fewest clients n with ``int(fraction * n) >= 1`` (Flower's cut per end), None for fraction 0."""
    if fraction <= 0:
        return None
    n = max(1, math.floor(1 / fraction))
    while int(fraction * n) < 1:
        n += 1
    return n


def _step_each(model_arrays: Mapping[str, np.ndarray], aggregated: ArrayRecord,
               step: Callable[[str, np.ndarray], np.ndarray]) -> ArrayRecord:
    """``x + step(name, mean - x)`` for every weight of the combined slice, in float64; 0-d weights (ARELU's
    alpha and beta) stay arrays, which Flower's Array requires."""
    out = {}
    for name, array in aggregated.items():
        x = model_arrays[name].astype(np.float64)
        out[name] = Array(np.asarray(x + step(name, array.numpy().astype(np.float64) - x), np.float32))
    return ArrayRecord(out)


def _payload_bytes(msg: Message) -> int:
    """Bytes of a reply's arrays, as far as they can be counted (a malformed reply is refused afterwards)."""
    try:
        return sum(r.count_bytes() for r in msg.content.array_records.values())
    except Exception:  # noqa: BLE001
        return 0


def _metrics(content: RecordDict) -> MetricRecord:
    return next(iter(content.metric_records.values()), MetricRecord())


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    return array.astype(dtype) if np.issubdtype(array.dtype, np.floating) else array
