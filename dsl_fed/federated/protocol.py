"""What the ServerApp and the ClientApp agree on beyond Flower's own message fields: error codes and config keys.

A node answers with an `flwr.app.Error` reply (never by raising, so its log gets one line instead of Flower's
traceback) carrying one of these codes; Flower's own codes are 0-8.
"""

from __future__ import annotations

NEEDS_FULL_MODEL = 4001
"""The node got only the weight slice but holds no model: its SuperNode restarted and lost ``context.state``.
The server sends it the full model within the same round (`SliceAggregation`)."""

NODE_FAILED = 4002
"""The node cannot do what it was asked (its data path is missing or empty, a label is outside the run's
classes, ...); the reason is one line naming the node. The server records a failed client and goes on."""

NEEDS_TRAINABLE_MODEL = 4003
"""A LiteRT node holds no trainable model with the sha256 the message names (first contact, or its cache is
gone); the server sends the model's bytes within the same round and from then on treats the node as LiteRT."""

TRAINABLE_SHA = "trainable-sha256"
"""Config key: sha256 of the trainable ``.tflite`` of the current global model (messages to LiteRT nodes)."""

TRAINABLE_MODEL = "trainable-model"
"""Config key: the trainable ``.tflite`` itself (bytes), sent when the node does not hold it yet."""

QUERY_CLIENT_ID = "query.client_id"
"""Message type the server sends (``federated.availability`` only) to learn a node's client id: Flower's node ids
are random, the availability trace names clients. The node answers without building a model (`client_app`)."""

IDENTITY = "identity"
"""ConfigRecord of a `QUERY_CLIENT_ID` reply; its key `CLIENT_ID` holds `node_identity.client_id` (an int)."""

CLIENT_ID = "client-id"

EVALUATE_FIRST = "evaluate-first"
"""Config key of a training message: score the global model it carries on the node's held-out clips before
training, as an evaluation message would, and put the counts into the reply's `EVALUATION` record. The server
asks so in a deployment, where a round's evaluation and the next round's training carry the same model: one
message per node and round instead of two (each costs a SuperNode seconds of pulling and pushing)."""

EVALUATION = "evaluation"
"""MetricRecord of a training reply to an `EVALUATE_FIRST` message: exactly an evaluation reply's metrics."""
