"""The Keras client: a node trains the phase's slice with Keras on its own clips; only that slice goes back.

`dsl_fed.federated.client_app` imports this module on a node's first Keras message, so a LiteRT node never
loads TensorFlow (see there for how messages reach it and how a node's failure becomes its reply).

A node is told by the server which phase to train (``config["phase"]``). It receives the full model the first
time it is addressed (kept in ``context.state``, i.e. on the node; a simulated node keeps only its weights'
sha256 there and the simulation process one copy of the arrays, `remember_full_model`) and afterwards only the
phase's trainable slice, which it loads on top. It trains that slice with `dsl_fed.train.train_local` on its own chunks
(``federated.local_update: gradient``: one step on its mean gradient, `dsl_fed.gradient_step`) and
replies with exactly those weights (an ArrayRecord keyed by weight name) and scalar metrics (under
``federated.dp`` only the example count and its id). Audio, spectrograms and any other weights never leave the
node. A node that gets a slice but holds no model (its SuperNode restarted) replies with a `NEEDS_FULL_MODEL`
error and gets the full model within the same round.

A process keeps the model of its run (`dsl_fed.federated.model_cache`): Ray reuses one actor for many nodes and
rounds, and building and tracing the model anew per message cost more than training it on a few chunks. Each
message loads every weight and resets the optimizer and every random stream from its (round, node) seed, so an
update never depends on what the actor ran before - a resumed run reproduces an uninterrupted one bit for bit.
The decoded clips are cached per process too (`_chunks`, least recently used dropped beyond `DECODED_BYTES`).
Phase 1 trains on backbone embeddings kept on the node (`node_cache`: the node config's ``cache-path``, else
``.dsl_fed_cache`` in its data folder, else - simulated nodes - the run's cache folder); they never leave it.

Evaluation replies carry confusion-matrix counts of the node's devel (and test) clips, so the server can sum
them into the exact global clip-level UAR without seeing a clip.
"""

from __future__ import annotations

import os

# Before TensorFlow is imported by dsl_fed (Flower's Ray actor may already have imported it; then the
# launcher's environment, which sets the same variables, has taken effect).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

import contextlib  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from collections import OrderedDict  # noqa: E402
from collections.abc import Iterator, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402

from dsl_fed.bottleneck import predict_clips_on_embeddings  # noqa: E402
from dsl_fed.config import Config, DataConfig, RobustnessConfig  # noqa: E402
from dsl_fed.data import ChunkSet, load_chunks  # noqa: E402
from dsl_fed.data.nodes import NodeData, node_data  # noqa: E402
from dsl_fed.embedding_cache import NODE_FOLDER, EmbeddingCache, for_config, node_folder  # noqa: E402
from dsl_fed.errors import DslFedError  # noqa: E402
from dsl_fed.metrics import confusion, uar  # noqa: E402
from dsl_fed.models import get_weights_by_name, set_phase, set_weights_by_name  # noqa: E402
from dsl_fed.models import trainable_weight_names, weight_names  # noqa: E402
from dsl_fed.predict import predict_clips  # noqa: E402
from dsl_fed.robustness import perturb_client  # noqa: E402
from dsl_fed.gradient_step import gradient_step  # noqa: E402
from dsl_fed.train import train_local  # noqa: E402
from dsl_fed.federated.model_cache import client_model  # noqa: E402
from dsl_fed.federated.node_identity import client_id, client_seed  # noqa: E402
from dsl_fed.federated.protocol import EVALUATE_FIRST, EVALUATION, NEEDS_FULL_MODEL  # noqa: E402
from dsl_fed.federated.run_config import config_from_run_config  # noqa: E402

MODEL_STATE_KEY = "dsl_fed-model"  # context.state entry holding the full model this node received
_PROXIMAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {weight: _Proximal}, kept for reuse
LOG = logging.getLogger("flwr").getChild("dsl_fed")  # Flower's handler writes it to the SuperNode's log


def handle(kind: str, msg: Message, context: Context, app_dir: Path | None) -> Message:
    """Answer a ``train`` or ``evaluate`` message, or ask for the full model when only a slice came to a node
    that holds none (its SuperNode restarted)."""
    if not bool(msg.content["config"].get("full-model", False)) and not holds_model(context, msg):
        LOG.warning("[dsl_fed] node %s: got only the weight slice but holds no model (restarted, or a simulation "
                    "process that never received it); asking the server for the full model", context.node_id)
        return Message(Error(code=NEEDS_FULL_MODEL, reason="holds no model (restarted)"), reply_to=msg)
    return (train if kind == "train" else evaluate)(msg, context, app_dir)


def train(msg: Message, context: Context, app_dir: Path | None = None) -> Message:
    """Train the requested phase on this node's shard; reply with the trained slice and metrics (and, when the
    server asks with `EVALUATE_FIRST`, the received model's evaluation, scored before training)."""
    began = time.perf_counter()
    cfg = config_from_run_config(context.run_config, app_dir)
    limit_threads(cfg.federated.client_cpus)
    config = msg.content["config"]
    server_round, phase = int(config["server-round"]), int(config["phase"])
    data = local_data(cfg, context, config)
    partition = client_id(context)
    chunks = train_chunks(cfg, data, partition)
    if chunks is None:
        raise _node_error(context, f"{data.source}: no training clips (partition train or no partition)")
    classes = list(data.classes)
    seed = client_seed(cfg.training.seed, server_round, partition)

    remember_full_model(msg, context)
    model = global_model(cfg, len(classes), msg, context, seed)
    evaluation = score(cfg, data, config, lambda: model) if config.get(EVALUATE_FIRST) else None
    set_phase(model, phase, cfg.training.unfrozen_layers)
    names = trainable_weight_names(model)
    missing = sorted(set(names) - set(msg.content["arrays"].keys()))
    if missing:
        raise _node_error(context, f"phase {phase} trains {len(names)} weights but the server sent none for "
                                   f"{missing[:3]}; server and clients must run the same config")
    anchor = get_weights_by_name(model, names)
    cache = node_cache(cfg, context)
    start = time.perf_counter()
    if cfg.federated.local_update == "gradient":
        loss = gradient_step(model, chunks, cfg, phase, seed)
    else:
        with proximal_term(model, anchor, float(config.get("proximal-mu", 0.0))):
            loss = train_local(model, chunks, None, cfg, phase, epochs=cfg.federated.local_epochs, verbose=0,
                               seed=seed, cache=cache).loss
    seconds = time.perf_counter() - start
    metrics: dict[str, int | float] = {"num-examples": len(chunks), "partition-id": partition}
    if "dp-clipping" not in config:  # under DP the node reports nothing the noise does not cover
        metrics["train-loss"] = float(loss)  # a gradient step's: the received model's loss on the node's clips
        if cfg.federated.local_update == "train":  # a single small step: not worth another pass over the clips
            _, probs, labels, _ = (predict_clips_on_embeddings(model, chunks, cfg, phase, cache)
                                   or predict_clips(model, chunks, batch_size=cfg.training.batch_size))
            metrics["train-uar"] = float(uar(labels, probs.argmax(axis=1)))
        metrics.update({
            "train-seconds": float(seconds),  # the local update alone
            "work-seconds": float(time.perf_counter() - began),  # + model build, loading, local UAR
        })
    dtype = str(config.get("transfer-dtype", "float32"))
    update = get_weights_by_name(model, names)
    content = RecordDict({
        "arrays": ArrayRecord({n: Array(w.astype(dtype)) for n, w in update.items()}),
        "metrics": MetricRecord(metrics),
    })
    if evaluation is not None:
        content[EVALUATION] = MetricRecord(evaluation)
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context, app_dir: Path | None = None) -> Message:
    """Score the global model on this node's own held-out clips; reply with confusion counts, never clips."""
    cfg = config_from_run_config(context.run_config, app_dir)
    limit_threads(cfg.federated.client_cpus)
    remember_full_model(msg, context)
    config = msg.content["config"]
    data = local_data(cfg, context, config)
    seed = client_seed(cfg.training.seed, int(config["server-round"]), client_id(context))
    metrics = score(cfg, data, config, lambda: global_model(cfg, len(data.classes), msg, context, seed))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def score(cfg: Config, data: NodeData, config: Mapping[str, object], model_fn) -> dict[str, int | list[int]]:
    """An evaluation reply's metrics: ``devel-confusion`` (and ``test-confusion`` when the server asks for
    ``evaluate-test``), the flattened class x class counts of clip-level predictions, and ``num-examples``, the
    clips scored (0: nothing to score). `model_fn` gives the model, built only if there is something to score."""
    parts = ("devel", "test") if bool(config.get("evaluate-test", False)) else ("devel",)
    k = len(data.classes)
    metrics: dict[str, int | list[int]] = {"num-examples": 0}
    model = None
    for part in parts:
        counts = np.zeros((k, k), dtype=np.int64)
        chunks = _chunks(cfg.data, data, part)
        if chunks is not None:
            model = model_fn() if model is None else model
            _, probs, labels, _ = predict_clips(model, chunks, batch_size=cfg.training.batch_size)
            counts = confusion(labels, probs.argmax(axis=1), k)
        metrics[f"{part}-confusion"] = [int(c) for c in counts.reshape(-1)]
        metrics["num-examples"] += int(counts.sum())
    return metrics


# ----------------------------------------------------------------------------------------------- model


def global_model(cfg: Config, num_classes: int, msg: Message, context: Context, seed: int):
    """The process's model (`client_model`: random streams reset for `seed`) holding the server's current weights.

    Call `remember_full_model` first. The node's stored full model supplies everything outside the slice: those
    weights are frozen in every phase up to now, so they equal the server's (phase 1's slice is contained in
    phase 2's). Every weight is loaded, so nothing of an earlier message stays in the model.
    """
    model = client_model(cfg, num_classes, seed)
    expected = set(weight_names(model))
    if set(_stored_names(context)) != expected:
        raise _node_error(context, "the model this node received does not match the model it builds from the run "
                                   "config (server and clients must run the same config)")
    received = {} if msg.content["config"].get("full-model", False) else _numpy(msg.content["arrays"])
    weights = stored_weights(context, [n for n in expected if n not in received])
    weights.update(received)
    set_weights_by_name(model, weights)
    return model


def remember_full_model(msg: Message, context: Context) -> None:
    """Keep the full model on the node when the server sends it (once per node, flagged ``full-model``).

    A deployed node keeps it in its ``context.state``. A simulated node's state lives in the simulation process
    with every other node's, so 2,000 nodes would keep 2,000 copies of a model whose part outside the slice is the
    same everywhere: there the state holds each weight's sha256 and the process keeps the arrays once
    (`SHARED_ARRAYS`). A process without them answers a slice with `NEEDS_FULL_MODEL`, as a restarted node does.
    """
    if bool(msg.content["config"].get("full-model", False)):
        received = {n: a.numpy().astype(np.float32) for n, a in msg.content["arrays"].items()}
        if shares_process():
            context.state[MODEL_STATE_KEY] = ConfigRecord(SHARED_ARRAYS.put(received))
        else:
            context.state[MODEL_STATE_KEY] = ArrayRecord({n: Array(a) for n, a in received.items()})
    elif not holds_model(context, msg):
        raise _node_error(context, "received only the weight slice but holds no model")


def holds_model(context: Context, msg: Message) -> bool:
    """Whether the node holds every weight `msg` does not bring (its stored model, or the process's copy of it)."""
    if MODEL_STATE_KEY in context.state.array_records:
        return True
    digests = context.state.config_records.get(MODEL_STATE_KEY)
    if digests is None:
        return False
    sent = set(msg.content["arrays"].keys()) if "arrays" in msg.content.array_records else set()
    return SHARED_ARRAYS.has({n: str(d) for n, d in digests.items() if n not in sent})


def stored_weights(context: Context, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Weights `names` of the model the node stored (`remember_full_model`), float32."""
    if MODEL_STATE_KEY in context.state.array_records:
        stored = context.state.array_records[MODEL_STATE_KEY]
        return {n: stored[n].numpy().astype(np.float32) for n in names}
    digests = context.state.config_records[MODEL_STATE_KEY]
    return SHARED_ARRAYS.get({n: str(digests[n]) for n in names})


def _stored_names(context: Context) -> list[str]:
    if MODEL_STATE_KEY in context.state.array_records:
        return list(context.state.array_records[MODEL_STATE_KEY].keys())
    return list(context.state.config_records[MODEL_STATE_KEY].keys())


def shares_process() -> bool:
    """Whether this process is a Ray actor of a simulation (it answers the messages of many nodes)."""
    ray = sys.modules.get("ray")  # never imported here: a process that has not loaded Ray is no Ray actor
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:  # noqa: BLE001 - no runtime context: not an actor
        return False


class ArrayStore:
    """Arrays by (weight name, sha256 of its bytes), least recently used dropped beyond `max_bytes`.

    Simulated nodes that received the same weights share one copy; a weight is found only under the digest of its
    exact bytes, so a node loads exactly what it received.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._arrays: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._bytes = 0

    def put(self, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
        """Store `arrays`; returns each name's digest."""
        digests = {}
        for name, array in arrays.items():
            array = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d weight 1-d)
            digest = hashlib.sha256(f"{array.dtype}:{array.shape}:".encode() + array.tobytes()).hexdigest()
            digests[name] = digest
            key = (name, digest)
            if key not in self._arrays:
                self._arrays[key] = array
                self._bytes += array.nbytes
            self._arrays.move_to_end(key)
        while self._bytes > self.max_bytes and len(self._arrays) > len(digests):
            _, dropped = self._arrays.popitem(last=False)
            self._bytes -= dropped.nbytes
        return digests

    def has(self, digests: Mapping[str, str]) -> bool:
        return all(key in self._arrays for key in digests.items())

    def get(self, digests: Mapping[str, str]) -> dict[str, np.ndarray]:
        out = {}
        for key in digests.items():
            self._arrays.move_to_end(key)
            out[key[0]] = self._arrays[key]
        return out

    def clear(self) -> None:
        self._arrays.clear()
        self._bytes = 0


SHARED_ARRAYS = ArrayStore(1 << 30)  # a simulation process's copies of its nodes' models (one model, a few heads)


@contextlib.contextmanager
def proximal_term(model, anchor: Mapping[str, np.ndarray], mu: float) -> Iterator[None]:
    """FedProx: add (mu/2)·||w - w_global||² over the trained slice to the training loss.

    Implemented as Keras variable regularisers (Keras adds every trainable variable's regulariser to the
    loss in `compute_loss`, which `DslModel.train_step` calls), removed again afterwards. A model keeps its
    regularisers (anchor and mu in variables) for the next message, so its traced train step stays valid.
    """
    if mu <= 0:
        yield
        return
    variables = {v.path: v for v in model.trainable_weights if v.path in anchor}
    previous = {name: v.regularizer for name, v in variables.items()}
    terms = _PROXIMAL.setdefault(model, {})
    for name, variable in variables.items():
        if name not in terms:
            terms[name] = _Proximal(anchor[name].shape)
        terms[name].set(anchor[name], mu)
        variable.regularizer = terms[name]
    try:
        yield
    finally:
        for name, variable in variables.items():
            variable.regularizer = previous[name]


class _Proximal:
    """Regulariser ``(mu/2)·||w - anchor||²`` for one variable (the FedProx proximal term); `set` per message."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.anchor = tf.Variable(tf.zeros(shape), trainable=False)
        self.mu = tf.Variable(0.0, trainable=False)

    def set(self, anchor: np.ndarray, mu: float) -> None:
        self.anchor.assign(anchor)
        self.mu.assign(mu)

    def __call__(self, weight):
        return 0.5 * self.mu * keras.ops.sum(keras.ops.square(weight - self.anchor))


# ------------------------------------------------------------------------------------------------ data


def local_data(cfg: Config, context: Context, config: Mapping[str, object]) -> NodeData:
    """This node's clips (`node_data`) with the class list the server sent (simulation: the corpus' own)."""
    classes = config.get("classes")
    try:
        return node_data(context.node_config, cfg.data, list(classes) if classes else None)
    except DslFedError as exc:
        raise _node_error(context, str(exc)) from None


def node_cache(cfg: Config, context: Context) -> EmbeddingCache | None:
    """Where this node keeps its embeddings: ``cache-path``, its data folder's ``.dsl_fed_cache``, or the run's."""
    if not cfg.training.embedding_cache:
        return None
    return for_config(node_folder(context.node_config, cfg), cfg, note=LOG.info)


NODE_CACHE_FOLDER = NODE_FOLDER


def _node_error(context: Context, message: str) -> DslFedError:
    return DslFedError(f"node {context.node_id}: {message}")


def train_chunks(cfg: Config, data: NodeData, partition: int) -> ChunkSet | None:
    """The node's training chunks; an experiment's simulated noise, label flips or skew act on this copy only."""
    chunks = _chunks(cfg.data, data, "train")
    if chunks is not None and cfg.robustness != RobustnessConfig():
        chunks = perturb_client(chunks, cfg.robustness, len(data.classes), partition, cfg.data.seed)
    return chunks


def _chunks(data_cfg: DataConfig, data: NodeData, part: str) -> ChunkSet | None:
    """Decoded chunks of one partition of the node's clips (None if it has none), cached per process."""
    return _decode(data_cfg, data.clips.get(part, ()), data.classes)


def _decode(data_cfg: DataConfig, clips: tuple, classes: Sequence[str]) -> ChunkSet | None:
    """Decode a clip set once per process (a Ray actor serves many nodes and rounds), within `DECODED_BYTES`."""
    key = (data_cfg, clips, tuple(classes))
    if key in _DECODED:
        _DECODED.move_to_end(key)
        return _DECODED[key]
    chunks = load_chunks(clips, data_cfg, list(classes), progress=False) if clips else None
    _DECODED[key] = chunks
    while len(_DECODED) > 1 and sum(_nbytes(c) for c in _DECODED.values()) > DECODED_BYTES:
        _DECODED.popitem(last=False)
    return chunks


def _nbytes(chunks: ChunkSet | None) -> int:
    return 0 if chunks is None else sum(a.nbytes for a in (chunks.waveforms, chunks.labels, chunks.clip_ids, chunks.speakers))


# Decoded chunks one process keeps: 128 MiB, some dozens of nodes (12 clips of one speaker take a few MB), so an
# actor serving thousands of simulated nodes holds a bounded share of them, not every node's audio.
DECODED_BYTES = 128 << 20
_DECODED: OrderedDict[tuple, ChunkSet | None] = OrderedDict()  # least recently used first


# ------------------------------------------------------------------------------------------------ misc


def limit_threads(cpus: float) -> bool:
    """Give TensorFlow as many threads as the node has CPUs (Ray runs several actors on the same cores).

    TensorFlow fixes its thread pools when it runs its first op, so this must happen before (the handlers call
    it first thing; nothing at import time runs an op). Returns whether the limits are in effect; if an op ran
    earlier with other limits they cannot change any more, which is logged rather than ignored.
    """
    n = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(n)
    threading = tf.config.threading
    with contextlib.suppress(RuntimeError):  # raised when TF's pools exist already with other sizes
        threading.set_intra_op_parallelism_threads(n)
        threading.set_inter_op_parallelism_threads(n)
    current = (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())
    if current != (n, n):
        _warn_threads_fixed(current, n)
    _report_threads(current)
    return current == (n, n)


@functools.cache  # once per process: a Ray actor or SuperNode log then shows what each process runs with
def _report_threads(current: tuple[int, int]) -> None:
    LOG.info("TensorFlow threads in process %d: %d intra-op / %d inter-op", os.getpid(), *current)


@functools.cache  # once per process and setting: every later message would say the same
def _warn_threads_fixed(current: tuple[int, int], n: int) -> None:
    logging.getLogger(__name__).warning(
        "TensorFlow already runs with %d intra-op / %d inter-op threads (0 = its default); the limit of %d "
        "(federated.client_cpus) cannot apply in this process", *current, n)


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {n: a.numpy().astype(np.float32) for n, a in record.items()}

