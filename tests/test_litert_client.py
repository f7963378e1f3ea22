"""LiteRT nodes: the ClientApp trains through the trainable .tflite in a process without TensorFlow.

One untrained tiny model (``weights: null``, dropout 0 so a LiteRT node's update can be recomputed exactly), its
trainable export made by the server's `TrainableSource`, and the real ClientApp answering messages.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flower_helpers import InProcessGrid, run_config, write_config
from flower_helpers import task_identity  # noqa: F401 (autouse fixture)

from dsl_fed.federated import litert_client
from dsl_fed.federated.client_app import app
from dsl_fed.federated.protocol import NEEDS_TRAINABLE_MODEL, NODE_FAILED, TRAINABLE_MODEL, TRAINABLE_SHA
from dsl_fed.federated.run_config import config_from_run_config

REPLY_ATOL = 1e-6  # a node's trained head vs the same steps run here with TrainableRunner (measured: 0, bit-equal)
# Mean train loss of a round, Keras vs LiteRT nodes: other batch orders and dropout masks (measured 0.006, 0.0005)
TRAIN_LOSS_GAP = 0.05


@pytest.fixture(scope="module")
def setup(demo_manifest, tmp_path_factory):
    """``(rc, cfg, classes, head weights, sha, model bytes)`` for 4 simulated LiteRT nodes of the demo corpus."""
    from types import SimpleNamespace

    from dsl_fed.data import read_manifest
    from dsl_fed.federated.server_app import slice_names
    from dsl_fed.federated.trainable_source import TrainableSource
    from dsl_fed.models import build_model, get_weights_by_name, weight_names

    folder = tmp_path_factory.mktemp("litert_client")
    rc = run_config(write_config(folder, demo_manifest, data={"shards": 4}, model={"dropout": 0.0},
                                 federated={"client_runtime": "litert", "local_epochs": 2}))
    cfg = config_from_run_config(rc)
    classes = read_manifest(demo_manifest).classes
    model = build_model(cfg, len(classes))
    full = get_weights_by_name(model, weight_names(model))
    head = {name: full[name] for name in slice_names(model, cfg)[1]}
    sha, content = TrainableSource(model, cfg, classes, list(head))(full, 1)
    return SimpleNamespace(rc=rc, cfg=cfg, classes=classes, head=head, sha=sha, content=content, model=model,
                           folder=folder)


def message(setup, kind: str = "train", **config) -> Message:
    config = {"server-round": 1, "phase": 1, "full-model": False, "transfer-dtype": "float32",
              "classes": setup.classes, TRAINABLE_SHA: setup.sha, TRAINABLE_MODEL: setup.content, **config}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in setup.head.items()}),
                          "config": ConfigRecord({k: v for k, v in config.items() if v is not None})})
    return Message(content, dst_node_id=100, message_type=kind)


def node(setup, tmp_path, **node_config) -> Context:
    node_config = node_config or {"partition-id": 0, "num-partitions": 4}
    return Context(run_id=1, node_id=100, node_config={"cache-path": str(tmp_path / "cache"), **node_config},
                   state=RecordDict(), run_config=dict(setup.rc))


def _runner(setup, tmp_path, content=None, seed=None):
    from dsl_fed.litert_training import TrainableRunner
    from dsl_fed.trainable_export import weight_key

    path = tmp_path / "expected.tflite"
    path.write_bytes(setup.content if content is None else content)
    runner = TrainableRunner(path, seed=seed)
    runner.restore({weight_key(name): value for name, value in setup.head.items()})
    return runner


def _chunks(setup, node_config, part):
    from dsl_fed.data import load_chunks
    from dsl_fed.data.nodes import node_data

    clips = node_data(node_config, setup.cfg.data, setup.classes).clips[part]
    return load_chunks(clips, setup.cfg.data, setup.classes, progress=False)


def _replayed(setup, tmp_path, context, content=None, dropout_seed=None):
    """The head after the Keras client's recipe, step by step, run here with `TrainableRunner`: batch 32, order
    from the (round 1, partition 0) seed, balanced class weights, dropout masks from `dropout_seed`."""
    from dsl_fed.class_balance import class_weights

    runner = _runner(setup, tmp_path, content, dropout_seed)
    chunks = _chunks(setup, context.node_config, "train")
    x = np.concatenate([runner.embed(chunks.waveforms[i:i + 32]) for i in range(0, len(chunks), 32)])
    weights = np.array([class_weights(chunks.labels, 3)[c] for c in range(3)], np.float32)
    rng = np.random.default_rng(setup.cfg.training.seed + 1000 * 1 + 0)
    for _ in range(2):  # federated.local_epochs
        order = rng.permutation(len(x))
        for begin in range(0, len(x), 32):
            batch = order[begin:begin + 32]
            runner.train(x[batch], chunks.labels[batch].astype(np.int32), weights)
    return runner.parameters(), chunks


def test_a_litert_nodes_reply_is_what_the_trainable_runner_gives_for_the_same_weights_data_and_seed(setup, tmp_path):
    from dsl_fed.trainable_export import weight_key

    context = node(setup, tmp_path)
    reply = app(message(setup), context)
    assert not reply.has_error(), reply.error.reason
    got = {name: array.numpy() for name, array in reply.content["arrays"].items()}
    assert sorted(got) == sorted(setup.head) and all(a.dtype == np.float32 for a in got.values())
    expected, chunks = _replayed(setup, tmp_path, context)
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[weight_key(name)], rtol=0, atol=REPLY_ATOL, err_msg=name)
        assert not np.array_equal(value, setup.head[name]) or name == "arelu/alpha", name  # it trained
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(chunks) and metrics["partition-id"] == 0 and np.isfinite(metrics["train-loss"])
    # the model is kept by its sha256 and the embeddings were cached: the next round needs neither again
    assert (tmp_path / "cache" / "trainable" / f"{setup.sha}.tflite").is_file()
    assert len(list((tmp_path / "cache").glob("*.emb"))) == 1


def test_a_litert_nodes_dropout_masks_come_from_its_round_and_node_seed(setup, tmp_path):
    from dsl_fed.federated.litert_runtime import DROPOUT_STREAM
    from dsl_fed.federated.node_identity import client_seed
    from dsl_fed.federated.trainable_source import TrainableSource
    from dsl_fed.models import build_model, get_weights_by_name, weight_names
    from dsl_fed.trainable_export import weight_key

    model = build_model(setup.cfg, len(setup.classes))
    model.classifier.get_layer("dropout").rate = 0.5
    full = get_weights_by_name(setup.model, weight_names(setup.model))
    sha, content = TrainableSource(model, setup.cfg, setup.classes, list(setup.head))(full, 1)
    context = node(setup, tmp_path)
    reply = app(message(setup, **{TRAINABLE_SHA: sha, TRAINABLE_MODEL: content}), context)
    assert not reply.has_error(), reply.error.reason
    got = {weight_key(name): array.numpy() for name, array in reply.content["arrays"].items()}
    seed = client_seed(setup.cfg.training.seed, 1, 0)
    expected, _ = _replayed(setup, tmp_path, context, content, (seed, DROPOUT_STREAM))
    other, _ = _replayed(setup, tmp_path, context, content, (seed + 1, DROPOUT_STREAM))  # another node's masks
    for key, value in got.items():
        np.testing.assert_allclose(value, expected[key], rtol=0, atol=REPLY_ATOL, err_msg=key)
    assert max(float(np.max(np.abs(got[key] - other[key]))) for key in got) > 1e-4


def test_a_litert_node_scores_its_own_held_out_clips_as_infer_of_embed(setup, tmp_path):
    from dsl_fed.deploy.split import split_corpus
    from dsl_fed.metrics import confusion
    from dsl_fed.predict import average_by_clip

    folders = split_corpus(setup.cfg.data.manifest, tmp_path / "nodes", nodes=2)
    context = node(setup, tmp_path, **{"data-path": str(folders[0]), "client-runtime": "litert"})
    reply = app(message(setup, kind="evaluate"), context)
    assert not reply.has_error(), reply.error.reason
    runner = _runner(setup, tmp_path)
    chunks = _chunks(setup, context.node_config, "devel")
    _, probs, labels, _ = average_by_clip(runner.infer(runner.embed(chunks.waveforms)), chunks)
    expected = confusion(labels, probs.argmax(axis=1), 3)
    assert reply.content["metrics"]["devel-confusion"] == expected.reshape(-1).tolist()
    assert reply.content["metrics"]["num-examples"] == expected.sum() > 0


def test_a_missing_damaged_or_foreign_trainable_model_is_one_clear_line(setup, tmp_path):
    from dsl_fed.federated.trainable_source import TrainableSource
    from dsl_fed.models import build_model, get_weights_by_name, weight_names

    context = node(setup, tmp_path)
    for missing in ({TRAINABLE_SHA: None, TRAINABLE_MODEL: None}, {TRAINABLE_MODEL: None}):  # first contact; lost
        reply = app(message(setup, **missing), context)
        assert reply.has_error() and reply.error.code == NEEDS_TRAINABLE_MODEL

    def failure(**config) -> str:
        reply = app(message(setup, **config), node(setup, tmp_path))
        assert reply.has_error() and reply.error.code == NODE_FAILED
        assert "\n" not in reply.error.reason
        return reply.error.reason

    assert "the trainable model received is damaged" in failure(**{TRAINABLE_MODEL: setup.content[:-100]})
    garbage = b"not a tflite model"
    reason = failure(**{TRAINABLE_SHA: hashlib.sha256(garbage).hexdigest(), TRAINABLE_MODEL: garbage})
    assert "not a loadable TFLite model" in reason
    two = build_model(setup.cfg, 2)
    weights = get_weights_by_name(two, weight_names(two))
    sha, content = TrainableSource(two, setup.cfg, ["falling", "rising"], list(setup.head))(weights, 1)
    reason = failure(**{TRAINABLE_SHA: sha, TRAINABLE_MODEL: content})
    assert reason.endswith("the trainable model has 2 classes, the run has 3 (falling, flat, rising)"), reason
    reply = app(message(setup), node(setup, tmp_path, **{"partition-id": 0, "num-partitions": 4, "client-runtime": "tflite"}))
    assert reply.error.code == NODE_FAILED
    assert reply.error.reason == "node config client-runtime: 'tflite' is not one of keras, litert"


# A deployed node's ClientApp process, as Flower starts one per message: the app module, one LiteRT train message.
_CLIENTAPP_PROCESS = """
import json, sys
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from dsl_fed.federated.client_app import app

folder = Path(sys.argv[1])
request = json.loads((folder / "request.json").read_text())
TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 1, 1  # what Flower's process would hold
with np.load(folder / "head.npz") as head:
    arrays = ArrayRecord({name: Array(head[name]) for name in head.files})
config = ConfigRecord({**request["config"], "trainable-model": (folder / "model.tflite").read_bytes()})
msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=100, message_type="train")
reply = app(msg, Context(run_id=1, node_id=100, node_config=request["node_config"], state=RecordDict(),
                         run_config=request["run_config"]))
print(json.dumps({"error": reply.error.reason if reply.has_error() else None,
                  "arrays": [] if reply.has_error() else sorted(reply.content["arrays"].keys()),
                  "loaded": [name for name in ("tensorflow", "keras", "tf_keras") if name in sys.modules]}))
"""


def test_a_litert_nodes_clientapp_process_never_imports_tensorflow_or_keras(setup, tmp_path):
    import json
    import subprocess

    assert TRAINABLE_MODEL == "trainable-model"  # the name the script above uses
    (tmp_path / "model.tflite").write_bytes(setup.content)
    np.savez(tmp_path / "head.npz", **setup.head)
    config = {"server-round": 1, "phase": 1, "full-model": False, "transfer-dtype": "float32",
              "classes": setup.classes, TRAINABLE_SHA: setup.sha}
    (tmp_path / "request.json").write_text(json.dumps({
        "config": config, "run_config": setup.rc,
        "node_config": {"cache-path": str(tmp_path / "cache"), "partition-id": 0, "num-partitions": 4}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _CLIENTAPP_PROCESS, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is None and result["arrays"] == sorted(setup.head)  # it trained the head
    assert result["loaded"] == []


@pytest.mark.slow  # the worker imports TensorFlow here on purpose: ~10 s
def test_a_worker_that_imported_tensorflow_is_refused(setup, tmp_path, monkeypatch):
    code = ("import sys, runpy, tensorflow; sys.argv = ['litert_runtime', sys.argv[1]]; "
            "runpy.run_module('dsl_fed.federated.litert_runtime', run_name='__main__')")
    monkeypatch.setattr(litert_client, "worker_command", lambda folder: [sys.executable, "-c", code, str(folder)])
    reply = app(message(setup), node(setup, tmp_path))
    assert reply.has_error() and reply.error.code == NODE_FAILED
    assert "imported tensorflow" in reply.error.reason and "\n" not in reply.error.reason


@pytest.fixture(scope="module")
def mixed_run(demo_manifest, tmp_path_factory):
    """2 Keras + 2 LiteRT nodes (``federated.litert_clients: 0.5``), 1 + 1 rounds through the real ServerApp.

    Returns (run directory, what every LiteRT worker reported: kind, pid, frameworks it had loaded).
    """
    from dsl_fed.federated.checkpoint import RunDirectory
    from dsl_fed.federated.server_app import run_server

    folder = tmp_path_factory.mktemp("mixed")
    rc = run_config(write_config(folder, demo_manifest, data={"shards": 4},
                                 federated={"litert_clients": 0.5, "phase1_rounds": 1, "phase2_rounds": 1,
                                            "min_available_nodes": 4}),
                    server_eval=demo_manifest)
    reports = []
    run_worker = litert_client.run_worker

    def recorded(request, weights):
        reply, trained = run_worker(request, weights)
        reports.append((request["kind"], request["partition"], reply["pid"], reply["frameworks"]))
        return reply, trained

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(litert_client, "run_worker", recorded)
        run_server(InProcessGrid(rc, 4), rc)
    return RunDirectory(config_from_run_config(rc).output.run_dir), reports


@pytest.mark.slow  # a federated run of the tiny model in-process, with LiteRT worker processes: ~40 s on 2 cores
def test_two_keras_and_two_litert_nodes_complete_phase_1_and_phase_2(mixed_run):
    from flower_helpers import saved_weights

    run, _ = mixed_run
    assert run.latest_round() == 2
    for k, head_only in ((1, 0), (2, 2)):
        clients = run.manifest(k)["extra"]["clients"]
        assert clients["aggregated"] == 4 and clients["failed"] == [] and clients["rejected"] == []
        assert clients["head_only"] == head_only  # phase 2: the LiteRT nodes reply with the head alone
    before, after = saved_weights(run.round_dir(1)), saved_weights(run.round_dir(2))
    assert not np.array_equal(before["tiny_conv3/kernel"], after["tiny_conv3/kernel"])  # the Keras nodes' backbone
    assert not np.array_equal(before["hidden/kernel"], after["hidden/kernel"])
    assert 0 <= run.manifest(2)["extra"]["devel"]["uar"] <= 1


@pytest.mark.slow  # shares the federated run above
def test_the_litert_nodes_trained_in_processes_that_never_imported_tensorflow(mixed_run):
    _, reports = mixed_run
    assert sorted((kind, partition) for kind, partition, _, _ in reports) == [
        ("train", 1), ("train", 1), ("train", 3), ("train", 3)]  # partitions 1 and 3 of 0..3 run LiteRT
    assert all(frameworks == [] and pid != os.getpid() for _, _, pid, frameworks in reports)
    assert "tensorflow" in sys.modules  # this process (server and Keras nodes) has it: the workers are apart


def _phase1_history(demo_manifest, folder, runtime: str, backbone: Path) -> list[dict]:
    """The history rows of a phase-1 federation (4 nodes, 2 rounds) all on `runtime`, scored on the server."""
    from dsl_fed.federated.checkpoint import RunDirectory
    from dsl_fed.federated.server_app import run_server

    rc = run_config(write_config(folder, demo_manifest, data={"shards": 4}, model={"weights": str(backbone)},
                                 federated={"client_runtime": runtime, "phase1_rounds": 2, "phase2_rounds": 0,
                                            "min_available_nodes": 4, "min_train_nodes": 4, "fraction_evaluate": 0.0}),
                    server_eval=demo_manifest)
    run_server(InProcessGrid(rc, 4), rc)
    return RunDirectory(config_from_run_config(rc).output.run_dir).read_history()


@pytest.mark.slow  # two federations of 4 nodes x 2 phase-1 rounds in-process: ~45 s on 2 cores
def test_a_litert_only_phase_1_run_reaches_the_keras_runs_devel_uar_within_its_ci(demo_manifest, deployed_tiny,
                                                                                   tmp_path):
    # Phase 1 trains the head on frozen features: the tiny CNN's random ones are too weak to tell the classes
    # apart (devel UAR near chance for both runtimes), so the backbone is one trained centrally on the train
    # speakers, as an ImageNet backbone is pretrained elsewhere.
    backbone = tmp_path / "backbone.weights.h5"
    deployed_tiny.model.backbone.save_weights(backbone)
    keras_rows = _phase1_history(demo_manifest, tmp_path / "keras", "keras", backbone)
    litert_rows = _phase1_history(demo_manifest, tmp_path / "litert", "litert", backbone)
    assert [r["round"] for r in keras_rows] == [r["round"] for r in litert_rows] == [1, 2]
    for k, l in zip(keras_rows, litert_rows):
        print(f"round {k['round']}: devel UAR Keras {k['devel_uar']:.3f} (95 % CI [{k['devel_ci_low']:.3f}, "
              f"{k['devel_ci_high']:.3f}]), LiteRT {l['devel_uar']:.3f}; train loss {k['train_loss']:.4f} / "
              f"{l['train_loss']:.4f}")
        assert k["devel_ci_low"] <= l["devel_uar"] <= k["devel_ci_high"]
        assert k["devel_uar"] > 0.5  # the features carry the classes: not a comparison of two chance runs
        assert abs(k["train_loss"] - l["train_loss"]) < TRAIN_LOSS_GAP
