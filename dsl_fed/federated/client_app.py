"""Flower ClientApp: routes each message to the node's runtime, Keras or LiteRT, and turns a failure into a reply.

A node's clips come from its node config (`dsl_fed.data.nodes.node_data`): its own folder in a deployment
(``data-path``), a speaker shard of the configured corpus in a simulation (``partition-id``). The class list
comes with every message from the server; a label outside it is an error naming the label and the node.

A Keras node (`dsl_fed.federated.keras_client`) trains the phase's slice with Keras; a LiteRT node
(``federated.client_runtime`` / ``litert_clients``, `dsl_fed.federated.litert_client`) trains the head through
the trainable ``.tflite`` in a process without TensorFlow. The Keras client is imported on the first Keras
message only, so a deployed LiteRT node's ClientApp process (Flower starts one per message) never loads
TensorFlow or Keras either: it runs Flower and numpy and starts the LiteRT worker.

A node answers the server's `QUERY_CLIENT_ID` (sent only with ``federated.availability``) with its client id,
without reading its data or building a model.

A node that cannot take part (data path missing or empty, a label outside the run's classes, ...) writes one
line to its log and replies with a `NODE_FAILED` error giving the reason: a raised exception would put Flower's
traceback in the node's log.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from dsl_fed.errors import DslFedError
from dsl_fed.federated import litert_client
from dsl_fed.federated.clipping import clipping_mod
from dsl_fed.federated.node_identity import client_id
from dsl_fed.federated.protocol import CLIENT_ID, IDENTITY, NODE_FAILED, QUERY_CLIENT_ID
from dsl_fed.federated.run_config import config_from_run_config

LOG = logging.getLogger("flwr").getChild("dsl_fed")  # Flower's handler writes it to the SuperNode's log


def create_app(app_dir: Path | None = None) -> ClientApp:
    """The ClientApp; `app_dir` is the app bundle a relative ``config`` in the run config is looked up in."""
    app = ClientApp()

    @app.train(mods=[clipping_mod])  # federated.dp.mode=client: clip the slice update before it leaves
    def _train(msg: Message, context: Context) -> Message:
        return handle("train", msg, context, app_dir)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle("evaluate", msg, context, app_dir)

    @app.query(QUERY_CLIENT_ID.split(".")[1])
    def _client_id(msg: Message, context: Context) -> Message:
        return answer_client_id(msg, context)

    return app


def answer_client_id(msg: Message, context: Context) -> Message:
    """The node's client id (`node_identity.client_id`), for the server's availability trace; no model, no data."""
    try:
        return Message(RecordDict({IDENTITY: ConfigRecord({CLIENT_ID: client_id(context)})}), reply_to=msg)
    except DslFedError as exc:
        LOG.error("[dsl_fed] %s", exc)
        return Message(Error(code=NODE_FAILED, reason=str(exc).removeprefix(f"node {context.node_id}: ")), reply_to=msg)


def handle(kind: str, msg: Message, context: Context, app_dir: Path | None) -> Message:
    """Answer a ``train`` or ``evaluate`` message with the node's runtime, or with the error reply the server
    acts on (see the module docstring)."""
    try:
        cfg = config_from_run_config(context.run_config, app_dir)
        if litert_client.node_runtime(cfg, context.node_config) == "litert":
            return litert_client.handle(msg, context, cfg)
        from dsl_fed.federated import keras_client  # noqa: PLC0415 - TensorFlow, for Keras nodes only

        return keras_client.handle(kind, msg, context, app_dir)
    except DslFedError as exc:
        LOG.error("[dsl_fed] %s", exc)
        reason = str(exc).removeprefix(f"node {context.node_id}: ")  # the server names the node itself
        return Message(Error(code=NODE_FAILED, reason=reason), reply_to=msg)


app = create_app()
