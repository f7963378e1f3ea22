"""A LiteRT node's own work - decode its clips, embed them, train the head, score it - with numpy and LiteRT only.

This is what a phone runs. It imports neither TensorFlow, Keras nor Flower: the trainable ``.tflite``
(`dsl_fed.trainable_export`) holds the frozen front end and the head's training step, and
`dsl_fed.litert_training.TrainableRunner` runs it. `dsl_fed.federated.litert_client` (the ClientApp's side)
starts it as a process of its own, ``python -m dsl_fed.federated.litert_runtime REQUEST_DIR``, because Flower's
simulation pools every node's ClientApp in shared Ray actors that have TensorFlow loaded for the Keras nodes.

Training follows the Keras client (`dsl_fed.train.train_local` on embeddings): the head's weights from the
server, the optimizer reset (``restore``), ``local_epochs`` epochs of ``training.batch_size`` batches (the
last one smaller) in an order drawn from the node's (round, node) seed, the balanced class weights of its own
labels, dropout masks drawn from a second stream of the same seed (`DROPOUT_STREAM`), so nodes and rounds
differ and a re-run repeats them. Embeddings are computed with ``embed`` once per trainable model and kept in the node's embedding
cache (keyed by the model's sha256 and the decoded chunks), so phase 1 embeds a node's clips once per run.

Request folder: ``request.json`` (what to do) and ``weights.npz`` (the head's weights by Keras name). Answer:
``reply.json`` with ``metrics`` (or ``error``: one line), the framework modules the process had loaded at the
end (``frameworks``), its pid; for training also ``reply.npz`` with the trained head by Keras name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.errors import DslFedError

FRAMEWORKS = ("tensorflow", "keras", "tf_keras", "flwr")  # a LiteRT node must load none of these
REQUEST, WEIGHTS, REPLY, REPLY_WEIGHTS = "request.json", "weights.npz", "reply.json", "reply.npz"
DROPOUT_STREAM = 1  # the dropout masks' seed is (seed, DROPOUT_STREAM); the batch order's is the seed itself


def run(folder: Path) -> dict[str, Any]:
    """Do the request in `folder`; returns the reply (also written to ``reply.json``)."""
    request = json.loads((folder / REQUEST).read_text())
    with np.load(folder / WEIGHTS) as stored:
        weights = {name: stored[name] for name in stored.files}
    try:
        if request["kind"] == "train":
            trained, metrics = train(request, weights)
            np.savez(folder / REPLY_WEIGHTS, **trained)
        else:
            metrics = evaluate(request, weights)
        reply: dict[str, Any] = {"metrics": metrics}
    except DslFedError as exc:
        reply = {"error": str(exc)}
    reply.update(frameworks=loaded_frameworks(), pid=os.getpid())
    (folder / REPLY).write_text(json.dumps(reply))
    return reply


def loaded_frameworks() -> list[str]:
    """The frameworks of `FRAMEWORKS` this process has imported."""
    return [name for name in FRAMEWORKS if name in sys.modules]


def train(request: dict[str, Any], weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the head for the request's epochs on the node's training clips; returns (head by name, metrics)."""
    from dsl_fed.class_balance import class_weights
    from dsl_fed.config import RobustnessConfig
    from dsl_fed.litert_training import train_epochs
    from dsl_fed.metrics import uar
    from dsl_fed.predict import average_by_clip
    from dsl_fed.robustness import perturb_client

    cfg, runner, classes, keys = _setup(request, weights)
    chunks = _chunks(cfg, request, classes, "train")
    if chunks is None:
        raise DslFedError("no training clips (partition train or no partition)")
    if cfg.robustness != RobustnessConfig():
        chunks = perturb_client(chunks, cfg.robustness, len(classes), int(request["partition"]), cfg.data.seed)
    x = _embed(runner, cfg, request, chunks)
    y = chunks.labels.astype(np.int32)
    balanced = cfg.training.class_balance == "class_weight"
    weight = np.array(list(class_weights(y, len(classes)).values()), np.float32) if balanced else None
    start = time.perf_counter()
    loss = train_epochs(runner, x, y, weight, cfg.training.batch_size, int(request["epochs"]), int(request["seed"]))
    seconds = time.perf_counter() - start
    params = runner.parameters()
    trained = {name: params[key] for name, key in keys.items()}
    _, probs, labels, _ = average_by_clip(_infer(runner, x, cfg.training.batch_size), chunks)
    metrics = {"num-examples": len(chunks), "train-loss": loss, "train-uar": uar(labels, probs.argmax(axis=1)),
               "train-seconds": seconds}
    return trained, metrics


def evaluate(request: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """Confusion counts of the head on the node's held-out clips (``parts``), as the Keras client replies."""
    from dsl_fed.metrics import confusion
    from dsl_fed.predict import average_by_clip

    cfg, runner, classes, _ = _setup(request, weights)
    k = len(classes)
    metrics: dict[str, Any] = {"num-examples": 0}
    for part in request["parts"]:
        counts = np.zeros((k, k), dtype=np.int64)
        chunks = _chunks(cfg, request, classes, part)
        if chunks is not None:
            x = _embed(runner, cfg, request, chunks)
            _, probs, labels, _ = average_by_clip(_infer(runner, x, cfg.training.batch_size), chunks)
            counts = confusion(labels, probs.argmax(axis=1), k)
        metrics[f"{part}-confusion"] = [int(c) for c in counts.reshape(-1)]
        metrics["num-examples"] += int(counts.sum())
    return metrics


def _setup(request: dict[str, Any], weights: dict[str, np.ndarray]):
    """The run's config, the trainable model holding the server's head, the run's classes, the head's keys."""
    from dsl_fed.config import from_dict
    from dsl_fed.litert_training import TrainableRunner

    cfg = from_dict(request["config"])
    classes = list(request["classes"])
    runner = TrainableRunner(request["model"], threads=int(request["threads"]),
                             seed=(int(request["seed"]), DROPOUT_STREAM))
    if runner.num_classes != len(classes):
        raise DslFedError(f"the trainable model has {runner.num_classes} classes, the run has {len(classes)} "
                          f"({', '.join(classes)})")
    keys = _head_keys(weights, runner)
    runner.restore({key: weights[name] for name, key in keys.items()})
    return cfg, runner, classes, keys


def _head_keys(weights: dict[str, np.ndarray], runner) -> dict[str, str]:
    """Keras name -> the trainable model's key of each head weight among the weights the server sent."""
    from dsl_fed.trainable_export import weight_key

    keys = {name: weight_key(name) for name in weights if weight_key(name) in runner.weight_shapes}
    if sorted(keys.values()) != sorted(runner.weight_shapes):
        raise DslFedError(f"the server sent no head weights for {', '.join(sorted(set(runner.weight_shapes) - set(keys.values())))} "
                          "of the trainable model")
    return keys


def _chunks(cfg, request: dict[str, Any], classes: list[str], part: str):
    """The node's decoded chunks of one partition (None if it has none)."""
    from dsl_fed.data import load_chunks
    from dsl_fed.data.nodes import node_data

    clips = node_data(request["node_config"], cfg.data, classes).clips.get(part, ())
    return load_chunks(clips, cfg.data, classes, progress=False) if clips else None


def _embed(runner, cfg, request: dict[str, Any], chunks) -> np.ndarray:
    """``embed`` of every chunk, read from the node's embedding cache when this model embedded them before."""
    from dsl_fed.embedding_cache import for_config

    def compute() -> np.ndarray:
        size = cfg.training.batch_size
        return np.concatenate([runner.embed(chunks.waveforms[i:i + size]) for i in range(0, len(chunks), size)])

    if request.get("cache") is None:
        return compute()
    cache = for_config(request["cache"], cfg, note=lambda line: print(line, file=sys.stderr))
    return cache.get(f"litert:{request['model_sha256']}", chunks.waveforms, compute)


def _infer(runner, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([runner.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dsl_fed.federated.litert_runtime REQUEST_DIR")
    run(Path(sys.argv[1]))
