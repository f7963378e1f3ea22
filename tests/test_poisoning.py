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
    from dsl_fed.federated import keras_client

    cfg = from_dict({"data": {"manifest": str(demo_manifest), "chunk_seconds": 1.0, "hop_seconds": 0.5, "shards": 2},
                     "output": {"directory": str(tmp_path)}})
    data = node_data({"partition-id": 0, "num-partitions": 2}, cfg.data, None)
    clean = keras_client.train_chunks(cfg, data, 0).labels
    seen = lambda msg: keras_client.train_chunks(cfg, data, 0).labels  # what the honest handler would train on
    tamper = attack_hook("label-flip", 3)
    np.testing.assert_array_equal(tamper(ATTACKER, None, seen), (clean + 1) % 3)
    np.testing.assert_array_equal(tamper(ATTACKER + 1, None, seen), clean)
    np.testing.assert_array_equal(keras_client.train_chunks(cfg, data, 0).labels, clean)  # patch undone


def test_a_rerun_skips_the_runs_already_recorded_with_the_same_settings(tmp_path):
    import json

    from simulations.poisoning import finished_cells

    path = tmp_path / "cells.jsonl"
    cell = {"uar": 0.5, "seconds": 10.0, "cpu_seconds": 8.0}
    rows = [{"base": ["a=1"], "strategy": "krum", "attack": "noise", **cell},
            {"base": ["a=2"], "strategy": "krum", "attack": "scale", **cell}]  # other settings: not reused
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert finished_cells(path, ["a=1"]) == {("krum", "noise"): cell}
    assert finished_cells(tmp_path / "none.jsonl", ["a=1"]) == {}


def test_verdicts_are_computed_from_the_table(tmp_path):
    import argparse

    from simulations.poisoning import write_results
    from simulations.run_setting import RunSetting

    uar = {("fedavg", "none"): 0.9, ("fedavg", "scale"): 0.4, ("fedmedian", "scale"): 0.86, ("krum", "scale"): 0.8}
    results = {cell: {"uar": u, "seconds": 1.0, "cpu_seconds": 30.0} for cell, u in uar.items()}
    args = argparse.Namespace(rounds=3, speakers=11, strategies="fedavg,fedmedian,krum", attacks="scale",
                              overrides=[], out=tmp_path / "p.md")
    setting = RunSetting(11, (1,) * 7, 2, 3, 7, 1e-5, "fixed", 1)
    write_results(args, setting, ["fedavg", "fedmedian", "krum"], ["none", "scale", "noise"], results)
    text = args.out.read_text()
    assert "- scale: fedmedian; FedAvg does not (0.400)." in text
    assert "- noise: not run (the grid was cut short)." in text
    assert "| krum | — | 0.800 | — |" in text and "4 runs, 2 CPU-minutes" in text
    assert args.out.with_suffix(".png").stat().st_size > 0
