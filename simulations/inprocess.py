"""Many small federated runs in one process, for experiment grids (poisoning, privacy/utility).

The project's own ClientApp (`dsl_fed.federated.client_app.app`, with its mods) answers the messages of the
project's own strategy (`make_strategy`), node by node, through a Grid that calls it directly: the same code
as ``dsl_fed simulate`` minus Ray, the SuperLink and per-round publishing, so a run of a few rounds takes
seconds and a grid of them fits a laptop. `tamper` lets an experiment change what chosen nodes send back.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from dsl_fed.config import Config, load_config
from dsl_fed.data import load_chunks, read_manifest
from dsl_fed.federated import client_app, keras_client
from dsl_fed.federated.prompt_grid import ImmediateReplies
from dsl_fed.federated.run_config import count_shards
from dsl_fed.federated.server_app import slice_names
from dsl_fed.federated.strategy import make_strategy
from dsl_fed.federated.trainable_source import TrainableSource
from dsl_fed.metrics import evaluate_chunks, uar
from dsl_fed.models import build_model, get_weights_by_name, set_weights_by_name, weight_names
from dsl_fed.predict import predict_clips
from dsl_fed.privacy import RunPrivacy, privacy_unit

Tamper = Callable[[int, Message, Callable[[Message], Message]], Message]  # (partition, msg, honest) -> reply


class InProcessGrid(ImmediateReplies):
    """The part of Flower's Grid a strategy uses; node ``i + 1`` holds partition ``i``."""

    def __init__(self, config_path: Path, overrides: list[str], num_nodes: int, tamper: Tamper | None = None):
        run_config = {"config": str(config_path.resolve()), "data-manifest": "", "output-directory": "/tmp",
                      "overrides": " ".join(overrides), "resume": False, "server-eval-manifest": ""}
        self.contexts = {
            i + 1: Context(run_id=0, node_id=i + 1, node_config={"partition-id": i, "num-partitions": num_nodes},
                           state=RecordDict(), run_config=run_config)
            for i in range(num_nodes)
        }
        self.tamper = tamper

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's Grid does: replies name it
            node = msg.metadata.dst_node_id
            context = self.contexts[node]

            def honest(m: Message, context=context) -> Message:
                return client_app.app(m, context)

            partition = int(context.node_config["partition-id"])
            reply = self.tamper(partition, msg, honest) if self.tamper else honest(msg)
            replies.append(reply)
        return replies


@dataclass(frozen=True)
class RunResult:
    devel_uar: float
    rounds: int
    epsilon: float | None
    seconds: float
    per_round: tuple[dict[str, float], ...] = ()  # with `score_rounds`: the UAR of each round's global model
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)  # the final global model


def run(config_path: Path, overrides: list[str], tamper: Tamper | None = None,
        score_rounds: tuple[str, ...] = ()) -> RunResult:
    """Train federated in-process and score the final global model on the devel speakers.

    `score_rounds` (partitions, e.g. ``("devel", "test")``) also scores every round's global model on them on
    the server, as ``dsl_fed simulate`` does, so a schedule screen sees its best round and not only its last.
    """
    start = time.perf_counter()
    cfg: Config = load_config(config_path, overrides)
    keras_client.limit_threads(cfg.federated.client_cpus)  # the clients take turns in this process: one client's share
    manifest = read_manifest(cfg.data.manifest, seed=cfg.data.seed)
    num_nodes = count_shards(cfg, manifest)
    keras.backend.clear_session()
    model = build_model(cfg, len(manifest.classes))
    slices = slice_names(model, cfg)
    strategy = make_strategy(cfg.federated, get_weights_by_name(model, weight_names(model)), slices,
                             num_nodes=num_nodes, seed=cfg.training.seed,
                             trainable=TrainableSource(model, cfg, manifest.classes, slices[1]))
    privacy = RunPrivacy.of(cfg.federated, num_nodes, privacy_unit(cfg)) if cfg.federated.dp.enabled else None
    rounds = privacy.last_round(strategy.schedule.num_rounds) if privacy else strategy.schedule.num_rounds
    grid = InProcessGrid(config_path, overrides, num_nodes, tamper)
    per_round: list[dict[str, float]] = []
    scorer = _RoundScorer(cfg, manifest, score_rounds, per_round) if score_rounds else None
    with task_identity():
        result = strategy.start(grid=grid, initial_arrays=strategy.full_record(), num_rounds=rounds,
                                evaluate_fn=scorer)
    keras.backend.clear_session()
    model = build_model(cfg, len(manifest.classes))
    weights = {name: array.numpy() for name, array in result.arrays.items()}
    set_weights_by_name(model, weights)
    devel = scorer.chunks.get("devel") if scorer else None  # loaded once when every round was scored on it
    if devel is None:
        devel = load_chunks(manifest.partition("devel", required=True), cfg.data, manifest.classes, progress=False)
    score = evaluate_chunks(model, devel, manifest.classes, batch_size=cfg.training.batch_size, seed=cfg.training.seed)
    return RunResult(float(score["uar"]), rounds, privacy.epsilon(strategy.dp_releases) if privacy else None,
                     time.perf_counter() - start, tuple(per_round), weights)


class _RoundScorer:
    """`evaluate_fn` for `Strategy.start`: the UAR of each round's full global model on held-out partitions."""

    def __init__(self, cfg: Config, manifest, partitions: tuple[str, ...], out: list[dict[str, float]]):
        self.cfg, self.out = cfg, out
        self.model = build_model(cfg, len(manifest.classes))
        self.chunks = {part: load_chunks(manifest.partition(part, required=True), cfg.data, manifest.classes,
                                         progress=False) for part in partitions}

    def __call__(self, server_round: int, arrays) -> None:
        if server_round == 0:
            return None
        set_weights_by_name(self.model, {name: array.numpy() for name, array in arrays.items()})
        scores = {}
        for part, chunks in self.chunks.items():
            _, probs, labels, _ = predict_clips(self.model, chunks, batch_size=self.cfg.training.batch_size)
            scores[part] = uar(labels, probs.argmax(axis=1))
        self.out.append(scores)
        return None


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """Flower stamps every message with its process's run/node/task ids; outside a Flower process there are none."""
    saved = {attr: getattr(TaskIdentity, attr, None) for attr in ("_run_id", "_node_id", "_task_id")}
    for attr in saved:
        setattr(TaskIdentity, attr, 1)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(TaskIdentity, attr, value)
