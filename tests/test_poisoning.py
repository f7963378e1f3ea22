"""The poisoning experiment's attackers change exactly what they claim to, and only the attacker's reply."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from flower_helpers import task_identity  # noqa: F401 (autouse fixture)
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # simulations/ is a folder of the repo, not installed
from simulations.poisoning import ATTACKER, attack_hook  # noqa: E402

GLOBAL = {"w": np.array([1.0, 2.0], np.float32), "b": np.array(0.5, np.float32)}  # b: a scalar weight (ARELU)
TRAINED = {"w": np.array([1.5, 1.0], np.float32), "b": np.array(0.75, np.float32)}


def exchange(attack: str, partition: int) -> dict[str, np.ndarray]:
    sent = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                               "config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN)

    def honest(msg: Message) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in TRAINED.items()}),
                                   "metrics": MetricRecord({"num-examples": 3})}), reply_to=msg)

    reply = attack_hook(attack, 3)(partition, sent, honest)
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def test_sign_flip_and_scale_send_the_boosted_update():
    flipped, scaled = exchange("sign-flip", ATTACKER), exchange("scale", ATTACKER)
    for name, g in GLOBAL.items():
        np.testing.assert_allclose(flipped[name], g - 10 * (TRAINED[name] - g))
        np.testing.assert_allclose(scaled[name], g + 10 * (TRAINED[name] - g))
    np.testing.assert_array_equal(exchange("sign-flip", ATTACKER + 1)["w"], TRAINED["w"])  # honest clients untouched


def test_noise_attack_replaces_the_update_by_unit_gaussian_noise():
    noisy = exchange("noise", ATTACKER)
    assert noisy["b"].shape == () and not np.allclose(noisy["w"], TRAINED["w"])
    assert np.all(np.abs(noisy["w"] - GLOBAL["w"]) < 6)  # N(0, 1) around the global weights


def test_label_flip_attacker_trains_on_labels_shifted_by_one_class(demo_manifest, tmp_path):
    from dsl_fed.config import from_dict
    from dsl_fed.data.nodes import node_data
    from dsl_fed.federated import client_app

    cfg = from_dict({"data": {"manifest": str(demo_manifest), "chunk_seconds": 1.0, "hop_seconds": 0.5, "shards": 2},
                     "output": {"directory": str(tmp_path)}})
    data = node_data({"partition-id": 0, "num-partitions": 2}, cfg.data, None)
    clean = client_app.train_chunks(cfg, data, 0).labels
    seen = lambda msg: client_app.train_chunks(cfg, data, 0).labels  # what the honest handler would train on
    tamper = attack_hook("label-flip", 3)
    np.testing.assert_array_equal(tamper(ATTACKER, None, seen), (clean + 1) % 3)
    np.testing.assert_array_equal(tamper(ATTACKER + 1, None, seen), clean)
    np.testing.assert_array_equal(client_app.train_chunks(cfg, data, 0).labels, clean)  # patch undone
