"""Client-side clipping for ``federated.dp.mode: client``: Flower's clipping mods, applied to the slice.

`fixedclipping_mod` / `adaptiveclipping_mod` clip ``reply - received`` and demand that the reply carries
exactly the arrays it received, in the same order. A node receives the full model once and replies with the
trained slice only, so `clipping_mod` shows the Flower mod a reply padded with the weights the node received
but did not train (unchanged, so their part of the update is exactly zero and the norm is the slice's), and
removes the padding again afterwards. Without a clipping norm in the message (no DP, evaluation) it does nothing.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this node's slice update to the norm the server sent (fixed or adaptive, as the server says)."""
    config = next(iter(msg.content.config_records.values()), None)
    if msg.metadata.message_type != MessageType.TRAIN or config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    received = next(iter(msg.content.array_records.values()))
    trained: list[str] = []

    def padded_app(inner: Message, ctx: Context) -> Message:
        reply = call_next(inner, ctx)
        if reply.has_error() or len(reply.content.array_records) != 1:
            return reply  # the Flower mod reports a malformed reply itself
        key, arrays = next(iter(reply.content.array_records.items()))
        if not set(arrays.keys()) <= set(received.keys()):
            return reply  # sends weights it never received: the Flower mod rejects the key mismatch
        trained.extend(arrays.keys())
        reply.content[key] = ArrayRecord({n: arrays[n] if n in arrays else received[n] for n in received.keys()})
        return reply

    mod = adaptiveclipping_mod if config.get("dp-clipping") == "adaptive" else fixedclipping_mod
    reply = mod(msg, context, padded_app)
    if not reply.has_error() and trained:
        key, arrays = next(iter(reply.content.array_records.items()))
        reply.content[key] = ArrayRecord({n: arrays[n] for n in trained})
    return reply
