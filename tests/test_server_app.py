"""ServerApp end to end in one process: real ClientApps behind an in-process Grid (no Ray), tiny model.

Covers the per-round outputs (round folders, manifests with sha256, `latest`, history, plot), what changes
in which phase, resume reproducing an uninterrupted run, failing / NaN clients, and the run-config mapping.
"""

from __future__ import annotations

import logging
import os
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flower_helpers import InProcessGrid, run_config, saved_weights, write_config
from flower_helpers import task_identity  # noqa: F401 (autouse fixture)

from dsl_fed.config import load_config
from dsl_fed.errors import DslFedError
from dsl_fed.export import read_export_manifest, sha256_file
from dsl_fed.federated.checkpoint import RunDirectory
from dsl_fed.federated.run_config import config_from_run_config, resume_requested, run_config_toml
from dsl_fed.federated.server_app import run_server

REPO = Path(__file__).resolve().parents[1]

HEAD = {"hidden/kernel", "hidden/bias", "arelu/alpha", "arelu/beta", "predictions/kernel", "predictions/bias"}


@pytest.fixture(scope="module")
def full_run(demo_manifest, tmp_path_factory):
    """An uninterrupted 2+1-round run of 3 nodes; returns (run config, run directory)."""
    rc = run_config(write_config(tmp_path_factory.mktemp("server"), demo_manifest), server_eval=demo_manifest)
    run_server(InProcessGrid(rc, 3), rc)
    return rc, RunDirectory(config_from_run_config(rc).output.run_dir)


@pytest.mark.slow  # a federated run of the tiny model in-process: 10-40 s on 2 cores
def test_every_round_is_published_with_manifest_tflite_and_history(full_run):
    rc, run = full_run
    assert run.latest_round() == 3 and os.readlink(run.path / "latest") == "round_3"
    head_bytes = ArrayRecord({n: Array(a) for n, a in saved_weights(run.round_dir(1)).items() if n in HEAD}).count_bytes()
    for k, phase in ((1, 1), (2, 1), (3, 2)):
        folder = run.round_dir(k)
        assert {p.name for p in folder.iterdir()} == {"model.keras", "model.tflite", "manifest.json"}
        manifest = read_export_manifest(folder / "model.tflite")  # raises if the sha256 does not match
        assert manifest.sha256 == sha256_file(folder / "model.tflite")
        extra = manifest.extra
        assert (extra["round"], extra["phase"], extra["num_rounds"]) == (k, phase, 3)
        devel = extra["devel"]
        assert 0 <= devel["ci"][0] <= devel["uar"] <= devel["ci"][1] <= 1 and devel["per_speaker"]
        spread = devel["speaker_spread"]  # fairness in every round manifest
        assert spread["min"] == min(devel["per_speaker"].values()) and spread["speakers"] == len(devel["per_speaker"])
        assert extra["clients"]["aggregated"] == 3 and extra["bytes_up"] > 0
    # after round 1 only the slice travels: 3 train messages down, 3 replies up (phase 1 = head); no evaluate
    # messages, because no training speaker of the demo corpus has held-out clips
    assert run.manifest(2)["extra"]["bytes_down"] == 3 * head_bytes
    assert run.manifest(2)["extra"]["bytes_up"] == 3 * head_bytes
    assert run.manifest(1)["extra"]["bytes_down"] > run.manifest(2)["extra"]["bytes_down"]  # full model once
    rows = run.read_history()
    assert [(int(r["round"]), int(r["phase"])) for r in rows] == [(1, 1), (2, 1), (3, 2)]
    assert all(0 <= float(r["devel_uar"]) <= 1 and int(r["clients_aggregated"]) == 3 for r in rows)
    assert (run.path / "plots" / "federated_uar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(run.path / "config.yaml") == config_from_run_config(rc)


@pytest.mark.slow  # a federated run of the tiny model in-process: 10-40 s on 2 cores
def test_phase1_changes_only_the_head_phase2_also_the_top_layers(full_run):
    _, run = full_run
    w = [saved_weights(run.round_dir(k)) for k in (1, 2, 3)]
    changed_in_phase1 = {n for n in w[0] if not np.array_equal(w[0][n], w[1][n])}
    changed_in_phase2 = {n for n in w[1] if not np.array_equal(w[1][n], w[2][n])}
    assert changed_in_phase1 <= HEAD
    assert {"hidden/kernel", "predictions/kernel"} <= changed_in_phase1
    # phase 2 unfreezes the top 2 backbone layers (tiny_pool, tiny_conv3): everything below stays put
    assert "tiny_conv3/kernel" in changed_in_phase2 and changed_in_phase2 <= HEAD | {"tiny_conv3/kernel", "tiny_conv3/bias"}


@pytest.mark.slow  # a federated run of the tiny model in-process: 10-40 s on 2 cores
def test_resume_after_round_2_reproduces_the_uninterrupted_round_3(full_run, tmp_path):
    rc, run = full_run
    stopped = tmp_path / "stopped"
    shutil.copytree(run.path, stopped / "fed", symlinks=True)
    shutil.rmtree(stopped / "fed" / "round_3")  # what a run stopped after round 2 leaves behind
    (stopped / "fed" / "latest").unlink()
    os.symlink("round_2", stopped / "fed" / "latest")
    resumed = {**rc, "output-directory": str(stopped), "resume": True}
    run_server(InProcessGrid(resumed, 3), resumed)
    again = RunDirectory(stopped / "fed")
    assert again.latest_round() == 3
    expected, got = saved_weights(run.round_dir(3)), saved_weights(again.round_dir(3))
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert [int(r["round"]) for r in again.read_history()] == [1, 2, 3]


@pytest.mark.slow  # a federated run of the tiny model in-process: 10-40 s on 2 cores
def test_a_raising_client_and_a_nan_client_do_not_stop_the_run(demo_manifest, tmp_path, caplog, monkeypatch):
    import dsl_fed.federated.keras_client as keras_client

    real_train_local = keras_client.train_local

    def train_local(*args, **kwargs):  # node 0's training crashes (its seed is client_seed(..., partition=0))
        if kwargs["seed"] % 1000 == 0:
            raise RuntimeError("disk full on node 0")
        return real_train_local(*args, **kwargs)

    def nan_weights(partition: int, msg: Message, reply: Message) -> Message:  # node 1 returns NaN weights
        if msg.metadata.message_type == "train" and partition == 1:
            arrays = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord({n: Array(np.full_like(a.numpy(), np.nan)) for n, a in arrays.items()})
        return reply

    monkeypatch.setattr(keras_client, "train_local", train_local)
    rc = run_config(write_config(tmp_path, demo_manifest, federated={"phase1_rounds": 1, "phase2_rounds": 0,
                                                                      "min_train_nodes": 1, "local_epochs": 1}),
                    server_eval=demo_manifest)
    with caplog.at_level(logging.INFO, logger="flwr.dsl_fed"), pytest.raises(DslFedError) as refused:
        run_server(InProcessGrid(rc, 3, sabotage=nan_weights), rc)
    # two of three nodes never contributed: the run is published but fails, naming both and why
    assert str(refused.value).startswith("2 node(s) never contributed an update: node 100: disk full on node 0; "
                                         "node 101 (partition 1): non-finite values")
    assert "allow_missing_clients" in str(refused.value)
    run = RunDirectory(tmp_path / "runs" / "fed")
    assert run.latest_round() == 1
    clients = run.manifest(1)["extra"]["clients"]
    assert clients["aggregated"] == 1 and clients["updated"]
    assert clients["failed"] == ["node 100: disk full on node 0"]
    assert len(clients["rejected"]) == 1 and "non-finite values" in clients["rejected"][0]
    assert "disk full on node 0" in caplog.text and "rejected the update of node 101" in caplog.text
    assert "clients 1/3 (1 failed, 1 rejected)" in caplog.text  # the per-round progress line
    assert all(np.all(np.isfinite(a)) for a in saved_weights(run.round_dir(1)).values())
    assert [m.split(":")[0] for m in run.manifest(1)["extra"]["never_contributed"]] == ["node 100", "node 101 (partition 1)"]
    accepted = {**rc, "overrides": "federated.allow_missing_clients=true output.name=accepted"}
    with caplog.at_level(logging.INFO, logger="flwr.dsl_fed"):
        run_server(InProcessGrid(accepted, 3, sabotage=nan_weights), accepted)  # finishes, with a warning
    assert "2 node(s) never contributed an update" in caplog.records[-1].getMessage()


@pytest.mark.slow  # a federated run of the tiny model in-process: 10-40 s on 2 cores
def test_resume_refuses_a_changed_config_or_a_missing_round(full_run, tmp_path, demo_manifest):
    rc, run = full_run
    changed = {**rc, "overrides": "training.learning_rate=0.5", "resume": True}
    with pytest.raises(DslFedError, match="training.learning_rate changed"):
        run_server(InProcessGrid(changed, 3), changed)
    empty = run_config(write_config(tmp_path, demo_manifest), resume=True, server_eval=demo_manifest)
    with pytest.raises(DslFedError, match="no complete round to resume"):
        run_server(InProcessGrid(empty, 3), empty)


def test_node_minimums_above_the_shard_count_are_an_error(tmp_path, demo_manifest):
    from dsl_fed.federated.run_config import check_federation_size, count_shards

    cfg = load_config(write_config(tmp_path, demo_manifest, federated={"min_available_nodes": 4, "min_train_nodes": 2}))
    with pytest.raises(DslFedError, match="min_available_nodes=4 but .* 3 training shard"):
        check_federation_size(cfg, count_shards(cfg))


def test_a_run_without_a_class_list_or_an_evaluation_is_refused(tmp_path, demo_manifest):
    rc = run_config(write_config(tmp_path, demo_manifest))
    with pytest.raises(DslFedError, match="no class list: set data.classes"):
        run_server(InProcessGrid(rc, 3), rc)
    rc["overrides"] = "data.classes=falling,flat,rising federated.fraction_evaluate=0"
    with pytest.raises(DslFedError, match="fraction_evaluate=0 and no server-eval-manifest"):
        run_server(InProcessGrid(rc, 3), rc)


def test_run_config_translation(tmp_path, demo_manifest):
    yaml_path = write_config(tmp_path, demo_manifest)
    overrides = ["federated.strategy=fedprox", "training.batch_size=16"]
    text = run_config_toml(yaml_path, overrides, tmp_path / "out", resume=True)
    translated = tomllib.loads(text)
    assert resume_requested(translated) and not resume_requested({**translated, "resume": False})
    assert config_from_run_config(translated) == load_config(yaml_path, overrides + [f"output.directory={tmp_path / 'out'}"])
    # the pyproject default: a preset inside the app bundle, data and outputs given as absolute paths
    bundled = {"config": "configs/quickstart.yaml", "data-manifest": str(demo_manifest),
               "output-directory": str(tmp_path / "o"), "overrides": "", "resume": False, "server-eval-manifest": ""}
    cfg = config_from_run_config(bundled, REPO)
    assert cfg.model.backbone == "tiny" and cfg.data.manifest == str(demo_manifest)
    with pytest.raises(DslFedError, match="'config' must be an absolute path"):
        config_from_run_config(bundled)  # no bundle to look a relative preset up in
    with pytest.raises(DslFedError, match="is relative.*output-directory="):
        config_from_run_config({**bundled, "output-directory": ""}, REPO)
    with pytest.raises(DslFedError, match="'data-manifest' must be an absolute path"):
        config_from_run_config({**bundled, "data-manifest": "demo_data/manifest.csv"}, REPO)
    with pytest.raises(DslFedError, match="lacks resume"):
        config_from_run_config({k: v for k, v in bundled.items() if k != "resume"})


def test_pyproject_app_config_matches_the_run_config_defaults():
    from dsl_fed.federated.run_config import DEFAULTS

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == DEFAULTS


@pytest.mark.slow  # a federated run of the tiny model in-process: 10-40 s on 2 cores
def test_a_server_without_audio_scores_by_summing_the_nodes_confusion_counts(demo_manifest, tmp_path):
    """Nodes hold only their own folders (train, devel and test speakers); the server holds no manifest.

    Node 101 restarts after round 1 (same node, empty state): round 2 sends it the full model again and it trains.
    """
    import keras

    from dsl_fed.data import load_chunks, read_manifest
    from dsl_fed.deploy.split import split_corpus
    from dsl_fed.metrics import evaluate_chunks

    folders = split_corpus(demo_manifest, tmp_path / "nodes", nodes=2)
    rc = run_config(write_config(tmp_path, demo_manifest, data={"manifest": "/nonexistent/manifest.csv"},
                                 federated={"phase1_rounds": 1, "phase2_rounds": 1, "min_available_nodes": 2,
                                            "evaluate_test": True}),
                    overrides="data.classes=falling,flat,rising")

    def restart(index, msg, reply):
        if index == 1 and msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 1:
            grid.contexts[101].state = RecordDict()
        return reply

    grid = InProcessGrid(rc, 2, sabotage=restart, node_configs=[{"data-path": str(f)} for f in folders])
    run_server(grid, rc)
    run = RunDirectory(tmp_path / "runs" / "fed")
    clients = run.manifest(2)["extra"]["clients"]
    assert clients["failed"] == [] and sorted(clients["contributors"]) == [100, 101]
    resent = [m for m in grid.sent if m.content["config"]["server-round"] == 2 and m.content["config"]["full-model"]]
    assert [(m.metadata.dst_node_id, m.metadata.message_type) for m in resent] == [(101, "train")]
    manifest = read_manifest(demo_manifest)
    for k in (1, 2):
        extra = run.manifest(k)["extra"]
        evaluation = extra["evaluation"]
        assert {key: evaluation[key] for key in ("kind", "nodes", "parts", "best_eligible")} == {
            "kind": "federated", "nodes": 2, "parts": ["devel", "test"], "best_eligible": True}
        assert sum(evaluation["devel_support"]) == evaluation["devel_clips"] == extra["devel"]["num_clips"]
        model = keras.saving.load_model(run.round_dir(k) / "model.keras")
        for part in ("devel", "test"):  # the same numbers as scoring every held-out clip in one place
            direct = evaluate_chunks(model, load_chunks(manifest.partition(part), load_config(run.path / "config.yaml").data,
                                                        manifest.classes, progress=False), manifest.classes)
            assert extra[part]["confusion"] == direct["confusion"] and extra[part]["num_clips"] == direct["num_clips"]
            assert extra[part]["uar"] == pytest.approx(direct["uar"], abs=1e-12)
            assert extra[part]["ci_clips"] == pytest.approx(direct["ci_clips"], abs=1e-12)
            # the server sees nodes, not speakers: its primary interval resamples the nodes that held clips
            assert extra[part]["ci_level"] in ("nodes", "nodes = clips") and direct["ci_level"] == "speakers"
        assert extra["devel"]["ci_groups"] == len(evaluation["devel_nodes"]) and set(evaluation["devel_nodes"]) <= {100, 101}
    uars = {k: run.manifest(k)["extra"]["devel"]["uar"] for k in (1, 2)}
    best = 1 if uars[1] >= uars[2] else 2
    assert run.best_round() == best and os.readlink(run.path / "best") == f"round_{best}"
    assert run.manifest(2)["extra"]["best_round"] == best
    # round 1's evaluation rides in round 2's training messages, round 2's goes out alone
    sent = [m for m in grid.sent if m.metadata.message_type == "evaluate" or m.content["config"].get("evaluate-first")]
    assert sorted((m.metadata.message_type, m.content["config"]["server-round"]) for m in sent) == [
        ("evaluate", 2), ("evaluate", 2), ("train", 2), ("train", 2), ("train", 2)]  # 101's sent again in full
    assert all(list(m.content["config"]["classes"]) == manifest.classes for m in sent)


def test_best_counts_only_rounds_scored_on_the_full_devel_set():
    """A round a node did not answer is scored on fewer clips; its higher UAR must not make it best."""
    from dsl_fed.federated.checkpoint import best_round

    rows = [{"round": 1, "devel_uar": 0.60, "devel_support": "10 10 10"},
            {"round": 2, "devel_uar": 0.90, "devel_support": "6 7 5"},  # one node missing: its clips are not scored
            {"round": 3, "devel_uar": 0.70, "devel_support": "10 10 10"},
            {"round": 4, "devel_uar": 0.70, "devel_support": "10 10 10"}]  # a tie: the earlier round stays best
    assert best_round(rows) == 3
    assert best_round(rows[:2]) == 1 and best_round(rows[1:2]) == 2  # alone, the partial round is the full set
    # A node heard from only later shows that the earlier rounds missed it: they stop counting.
    assert best_round([*rows, {"round": 5, "devel_uar": 0.65, "devel_support": "12 10 10"}]) == 5
    assert best_round([{"round": 1, "devel_uar": 0.5}, {"round": 2, "devel_uar": 0.8}]) == 2  # older history.csv
    assert best_round([{"round": 1, "devel_uar": 0.5, "devel_support": 36}, {"round": 2, "devel_uar": 0.6,
                                                                               "devel_support": "36"}]) == 2
    assert best_round([{"round": 1}]) is None


@pytest.mark.slow  # a federated run of the tiny model in-process: 10-40 s on 2 cores
def test_a_round_missing_an_evaluation_node_is_recorded_and_never_best(demo_manifest, tmp_path):
    from dsl_fed.deploy.split import split_corpus
    from dsl_fed.federated.protocol import EVALUATION

    folders = split_corpus(demo_manifest, tmp_path / "nodes", nodes=2)
    rc = run_config(write_config(tmp_path, demo_manifest, data={"manifest": "/nonexistent/manifest.csv"},
                                 federated={"phase1_rounds": 2, "phase2_rounds": 1, "min_available_nodes": 2}),
                    overrides="data.classes=falling,flat,rising")

    def lost_evaluation(index, msg, reply):
        """Node 101's round-2 evaluation (it rides in its round-3 training message) never reaches the server."""
        if index == 1 and msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 3:
            del reply.content[EVALUATION]
        return reply

    run_server(InProcessGrid(rc, 2, sabotage=lost_evaluation, node_configs=[{"data-path": str(f)} for f in folders]), rc)
    run = RunDirectory(tmp_path / "runs" / "fed")
    extra = {k: run.manifest(k)["extra"] for k in (1, 2, 3)}
    full = extra[1]["evaluation"]
    assert sorted(full["devel_nodes"]) == [100, 101] and full["best_eligible"] and extra[3]["evaluation"]["best_eligible"]
    partial = extra[2]["evaluation"]
    assert partial["nodes"] == 1 and partial["devel_nodes"] == [100] and partial["best_eligible"] is False
    assert partial["devel_clips"] < full["devel_clips"] == extra[1]["devel"]["num_clips"]
    assert partial["best_note"] == (f"not eligible for best: scored on {partial['devel_clips']} devel clips, the run's "
                                    f"full devel set has {full['devel_clips']}")
    uars = {k: extra[k]["devel"]["uar"] for k in (1, 3)}
    best = 1 if uars[1] >= uars[3] else 3
    assert run.best_round() == best and extra[3]["best_round"] == best
    rows = run.read_history()
    assert [r["devel_clips"] for r in rows] == [full["devel_clips"], partial["devel_clips"], full["devel_clips"]]
    assert rows[0]["devel_ci_level"] == "nodes" and rows[0]["devel_ci_clips_low"] <= rows[0]["devel_uar"]


def test_a_run_whose_every_client_fails_round_1_fails_with_the_reason(demo_manifest, tmp_path, monkeypatch):
    import dsl_fed.federated.keras_client as keras_client

    def broken(*args, **kwargs):
        raise RuntimeError("corrupt shard")

    monkeypatch.setattr(keras_client, "train_local", broken)
    rc = run_config(write_config(tmp_path, demo_manifest, federated={"phase1_rounds": 1, "phase2_rounds": 1}),
                    server_eval=demo_manifest)
    with pytest.raises(DslFedError, match=r"^every client failed round 1, so nothing was trained: node 10\d: corrupt"):
        run_server(InProcessGrid(rc, 3), rc)
    assert RunDirectory(tmp_path / "runs" / "fed").latest_round() is None  # nothing untrained was published
