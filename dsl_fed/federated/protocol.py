"""What the ServerApp and the ClientApp agree on beyond Flower's own message fields: two error codes.

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
