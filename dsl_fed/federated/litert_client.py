"""The ClientApp's LiteRT runtime: a node that trains through the trainable ``.tflite`` instead of Keras.

Which nodes: the node config's ``client-runtime`` (``keras`` | ``litert``) if set, else in a simulation
``federated.runtime_of(partition-id)`` (``federated.litert_clients`` spread over partition ids, or every node
with ``federated.client_runtime: litert``), else ``federated.client_runtime``.

The server ships the trainable model of its current global model (`dsl_fed.federated.trainable_source`) in the
message config as bytes with their sha256; the node keeps it in its cache folder (``trainable/<sha256>.tflite``
beside the embeddings), so it travels again only when the frozen part changed (phase 2: every round). A
message naming a model the node does not hold gets a `NEEDS_TRAINABLE_MODEL` reply, and the server sends it
within the round. The arrays carry the head's
weights (phase 1's slice); the node trains the head only, in every phase, and replies with it under the Keras
weight names, so the server aggregates it like any other update (phase 2: see `SliceAggregation`).

The work itself - decoding, ``embed``, ``train``, ``infer`` - runs in a process of its own that imports numpy
and LiteRT only (`dsl_fed.federated.litert_runtime`): Flower's simulation runs every node's ClientApp in shared
Ray actors, where a Keras node has loaded TensorFlow before. That process reports the frameworks it had loaded,
and a reply from one that loaded TensorFlow or Keras is refused here rather than sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

from dsl_fed.config import Config
from dsl_fed.data.nodes import node_data
from dsl_fed.embedding_cache import mark_folder, node_folder
from dsl_fed.errors import DslFedError
from dsl_fed.io import atomic_write
from dsl_fed.federated import litert_runtime
from dsl_fed.federated.node_identity import client_id, client_seed
from dsl_fed.federated.protocol import NEEDS_TRAINABLE_MODEL, TRAINABLE_MODEL, TRAINABLE_SHA

LOG = logging.getLogger("flwr").getChild("dsl_fed")
RUNTIMES = ("keras", "litert")
MODELS_KEPT = 2  # trainable models a node keeps (the current one and the one before)
WORKER_TIMEOUT = 3600.0  # seconds one message's LiteRT work may take
_SHA256 = re.compile(r"[0-9a-f]{64}")


def node_runtime(cfg: Config, node_config: Mapping[str, object]) -> str:
    """``keras`` or ``litert`` for this node (see the module docstring)."""
    if "client-runtime" in node_config:
        runtime = str(node_config["client-runtime"])
        if runtime not in RUNTIMES:
            raise DslFedError(f"node config client-runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
        return runtime
    if "partition-id" in node_config:
        return cfg.federated.runtime_of(int(node_config["partition-id"]))
    return cfg.federated.client_runtime


def handle(msg: Message, context: Context, cfg: Config) -> Message:
    """Answer a train or evaluate message on a LiteRT node (DslFedError: the caller's one-line error reply)."""
    began = time.perf_counter()
    config = msg.content["config"]
    folder = node_folder(context.node_config, cfg)
    model = trainable_file(folder / "trainable", config)
    if model is None:
        LOG.info("[dsl_fed] node %s: LiteRT runtime without the trainable model %s; asking the server for it",
                 context.node_id, str(config.get(TRAINABLE_SHA, "(none named)"))[:12])
        return Message(Error(code=NEEDS_TRAINABLE_MODEL, reason="holds no trainable model of this name"), reply_to=msg)
    classes = config.get("classes")
    data = node_data(context.node_config, cfg.data, list(classes) if classes else None)
    train = msg.metadata.message_type == "train"
    partition = client_id(context)
    request = {
        "kind": "train" if train else "evaluate",
        "config": cfg.to_dict(),
        "node_config": dict(context.node_config),
        "classes": list(data.classes),
        "model": str(model),
        "model_sha256": model.stem,
        "threads": max(1, int(cfg.federated.client_cpus)),
        "cache": str(folder) if cfg.training.embedding_cache else None,
        "partition": partition,
        "seed": client_seed(cfg.training.seed, int(config["server-round"]), partition),
        "epochs": cfg.federated.local_epochs,
        "parts": ["devel", "test"] if bool(config.get("evaluate-test", False)) else ["devel"],
    }
    reply, trained = run_worker(request, _arrays(msg))
    metrics = reply["metrics"]
    if not train:
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    metrics.update({"partition-id": partition, "work-seconds": time.perf_counter() - began})
    dtype = str(config.get("transfer-dtype", "float32"))
    arrays = ArrayRecord({name: Array(trained[name].astype(dtype)) for name in sorted(trained)})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def trainable_file(folder: Path, config: Mapping[str, object]) -> Path | None:
    """The trainable model the message names: stored first if it came with the message; None if the node lacks it.

    Raises:
        DslFedError: the bytes sent do not have the announced sha256.
    """
    sha = config.get(TRAINABLE_SHA)
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        return None
    path = folder / f"{sha}.tflite"
    content = config.get(TRAINABLE_MODEL)
    if content is not None:
        if not isinstance(content, bytes) or hashlib.sha256(content).hexdigest() != sha:
            raise DslFedError(f"the trainable model received is damaged (its sha256 is not the announced {sha[:12]}...)")
        try:
            mark_folder(folder.parent)  # the node's cache folder: our tag first, so it stays a cache folder
        except OSError as exc:
            raise DslFedError(f"cannot keep the trainable model: {exc}") from None
        atomic_write(path, content)
        for old in sorted(folder.glob("*.tflite"), key=lambda p: p.stat().st_mtime)[:-MODELS_KEPT]:
            old.unlink(missing_ok=True)
        return path
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
        return path
    path.unlink(missing_ok=True)  # damaged on disk: the server sends it again
    return None


def run_worker(request: dict, weights: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """Run `litert_runtime` in its own process; its reply and (training) the trained head by name.

    Raises:
        DslFedError: the worker's own one-line error, a crash (its last stderr line), or a worker that loaded
            TensorFlow or Keras.
    """
    with tempfile.TemporaryDirectory(prefix="dsl_fed_litert_") as tmp:
        folder = Path(tmp)
        (folder / litert_runtime.REQUEST).write_text(json.dumps(request))
        np.savez(folder / litert_runtime.WEIGHTS, **weights)
        try:
            done = subprocess.run(worker_command(folder), capture_output=True, text=True, timeout=WORKER_TIMEOUT,
                                  env=_worker_env(request["threads"]))
        except subprocess.TimeoutExpired:
            raise DslFedError(f"LiteRT worker took longer than {WORKER_TIMEOUT:.0f} s and was stopped") from None
        reply_path = folder / litert_runtime.REPLY
        if done.returncode != 0 or not reply_path.is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise DslFedError(f"LiteRT worker failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")
        reply = json.loads(reply_path.read_text())
        frameworks = [name for name in reply["frameworks"] if name in ("tensorflow", "keras", "tf_keras")]
        if frameworks:
            raise DslFedError(f"the LiteRT worker (pid {reply['pid']}) imported {', '.join(frameworks)}; a LiteRT "
                              "node must run without them")
        if "error" in reply:
            raise DslFedError(reply["error"])
        trained = {}
        if (folder / litert_runtime.REPLY_WEIGHTS).is_file():
            with np.load(folder / litert_runtime.REPLY_WEIGHTS) as stored:
                trained = {name: stored[name] for name in stored.files}
    LOG.info("[dsl_fed] LiteRT worker pid %s (started by pid %d): %s; frameworks loaded: %s", reply["pid"],
             os.getpid(), request["kind"], ", ".join(reply["frameworks"]) or "none")
    return reply, trained


def worker_command(folder: Path) -> list[str]:
    """The command line of the LiteRT worker for one request folder."""
    return [sys.executable, "-m", "dsl_fed.federated.litert_runtime", str(folder)]


def _worker_env(threads: int) -> dict[str, str]:
    """The worker's environment: dsl_fed importable from where this process has it, the node's thread share."""
    import sysconfig

    import dsl_fed

    root = str(Path(dsl_fed.__file__).resolve().parents[1])
    env = dict(os.environ)
    installed = {str(Path(sysconfig.get_paths()[key]).resolve()) for key in ("purelib", "platlib")}
    if root not in installed:  # a checkout or an app bundle (an installed package is found anyway)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    """The message's weights, float32 (the head; the worker picks the trainable model's head weights by name)."""
    return {name: array.numpy().astype(np.float32) for name, array in msg.content["arrays"].items()}
