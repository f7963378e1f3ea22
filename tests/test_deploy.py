"""A real Flower deployment on 127.0.0.1: SuperLink + SuperNodes as separate processes, TLS, node authentication.

Slow (each federation costs ~20-60 s of Flower start-up on 2 cores). Every process started gets an environment
marker unique to the test; afterwards no process anywhere on the machine may carry it.
"""

from __future__ import annotations

import csv
import threading
import time
import uuid

import numpy as np
import pytest
from flower_helpers import saved_weights, write_config

from dsl_fed.deploy.local import LoopbackFederation, deploy_local
from dsl_fed.federated.checkpoint import RunDirectory
from dsl_fed.federated.watchdog import guard, processes_with

pytestmark = pytest.mark.slow

MARKER = "DSL_FED_TEST_DEPLOY"  # inherited by every process the tests start, directly or not

FEDERATED = {"phase1_rounds": 1, "phase2_rounds": 1, "local_epochs": 1, "min_train_nodes": 2,
             "min_available_nodes": 3}


@pytest.fixture(scope="module")
def marker():
    value = uuid.uuid4().hex
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MARKER, value)
        yield value


@pytest.fixture(scope="module")
def deployed(demo_manifest, tmp_path_factory, marker):
    """`dsl_fed deploy local` on the demo corpus: 3 nodes, 1 + 1 rounds of the tiny model."""
    config = write_config(tmp_path_factory.mktemp("deploy"), demo_manifest, federated=FEDERATED)
    lines: list[str] = []
    run_dir = deploy_local(config, nodes=3, echo=lines.append)
    return config, run_dir, lines, processes_with(MARKER, marker)


def test_loopback_deployment_with_tls_and_node_auth_trains_and_scores_federated(deployed, demo_manifest):
    from dsl_fed.config import load_config
    from dsl_fed.data import load_chunks, read_manifest
    from dsl_fed.metrics import evaluate_chunks
    from dsl_fed.models import load_model

    _, run_dir, lines, leftovers = deployed
    assert leftovers == []  # SuperLink, SuperExecs, ServerApp, SuperNodes, ClientApps: all gone
    assert any("TLS on, node authentication on" in line and "127.0.0.1:" in line for line in lines)
    rounds = [line.split(" |")[0] for line in lines if line.startswith("round ")]
    assert rounds == ["round 1/2 phase 1", "round 2/2 phase 2"]  # each printed once
    run = RunDirectory(run_dir)
    assert run.latest_round() == 2 and run.best_round() in (1, 2)
    manifest = read_manifest(demo_manifest)
    cfg = load_config(run_dir / "config.yaml")
    assert list(cfg.data.classes) == manifest.classes
    devel = load_chunks(manifest.partition("devel"), cfg.data, manifest.classes, progress=False)
    for k in (1, 2):
        extra = run.manifest(k)["extra"]
        assert extra["evaluation"] == {"kind": "federated", "nodes": 2, "parts": ["devel"]}  # node 2 has no devel
        assert extra["clients"]["aggregated"] == 3
        direct = evaluate_chunks(load_model(run.round_dir(k) / "model.keras"), devel, manifest.classes)
        assert extra["devel"]["confusion"] == direct["confusion"]
        assert extra["devel"]["uar"] == pytest.approx(direct["uar"], abs=1e-12)


def test_every_node_held_only_its_own_speakers(deployed, demo_manifest):
    from dsl_fed.data import read_manifest

    _, run_dir, _, _ = deployed
    nodes = sorted((run_dir.parent / f"{run_dir.name}.deploy" / "nodes").iterdir())
    assert [n.name for n in nodes] == ["node_0", "node_1", "node_2"]
    owner: dict[str, str] = {}
    for node in nodes:
        with (node / "manifest.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert sorted(p.relative_to(node).as_posix() for p in node.rglob("*.wav")) == sorted(r["filename"] for r in rows)
        for row in rows:
            assert owner.setdefault(row["speaker"], node.name) == node.name
    assert set(owner) == set(read_manifest(demo_manifest).speakers())


def test_faults_server_killed_and_resumed_node_killed_unregistered_node_refused(deployed, demo_manifest, tmp_path,
                                                                                 marker):
    """One federation, three faults:

    1. the SuperLink (with the ServerApp under it) is SIGKILLed after round 1; restarted on the same database and
       resumed, round 2 has exactly the weights of the uninterrupted run (`deployed`);
    2. a SuperNode whose key was never registered is refused and the run is unaffected;
    3. a SuperNode SIGKILLed while round 3 trains: the round completes with the other two after Flower's
       heartbeat timeout, and the failure is recorded against the right node.
    """
    from dsl_fed.deploy.certs import write_certificates
    from dsl_fed.deploy.split import split_corpus
    from dsl_fed.federated.run_config import run_config_toml, write_app

    config, uninterrupted, _, _ = deployed
    folders = split_corpus(demo_manifest, tmp_path / "nodes", nodes=3)
    certs = write_certificates(tmp_path / "certs", ["127.0.0.1"], 4)  # node_3's key is never registered
    # min_available_nodes=2: once node 2 is gone the evaluation and later sampling must not wait for it
    overrides = ["data.classes=falling,flat,rising", "federated.phase2_rounds=2", "federated.min_available_nodes=2"]
    lines: list[str] = []
    app = write_app(tmp_path / "app")

    def submit(fed: LoopbackFederation, resume: bool, name: str) -> threading.Thread:
        run_config = tmp_path / f"{name}.toml"
        run_config.write_text(run_config_toml(config, overrides, tmp_path / "runs", resume))
        thread = threading.Thread(target=fed.run, args=(app, run_config, lines.append), daemon=True)
        thread.start()
        return thread

    def wait_for(text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in lines):
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s: {lines[-5:]}"
            time.sleep(0.5)

    run = RunDirectory(tmp_path / "runs" / "fed")
    with guard() as run_marker, LoopbackFederation(tmp_path / "work", certs, folders, env=run_marker) as fed:
        fed.start_superlink()
        for k in range(3):
            fed.register(k)
            fed.start_node(k)
        rogue = fed.start_node(2, key=certs / "node_3", name="rogue")  # node 2's data, an unknown key
        fed.wait_for_nodes(3)
        first = submit(fed, resume=False, name="first")
        wait_for("round 1/3")
        fed.kill("superlink")  # the ServerApp dies with it, mid-run
        first.join(timeout=120)
        assert run.latest_round() == 1
        fed.start_superlink()  # same port and database: the nodes reconnect
        fed.wait_for_nodes(3)
        lines.clear()
        second = submit(fed, resume=True, name="resumed")
        wait_for("round 2/3")
        time.sleep(3)  # round 3 is training now
        fed.kill("node_2")
        second.join(timeout=600)
        assert rogue.poll() is not None and rogue.returncode != 0
        rogue_log = (fed.logs / "rogue.log").read_text()
    assert "2004" in rogue_log or "Failed to activate" in rogue_log, rogue_log[-2000:]
    expected, got = saved_weights(uninterrupted / "round_2"), saved_weights(run.round_dir(2))
    for name in expected:  # the configs differ only in keys round 2 does not depend on (all 3 nodes are sampled)
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert run.latest_round() == 3
    clients = run.manifest(3)["extra"]["clients"]
    assert clients["aggregated"] == 2 and len(clients["failed"]) == 1
    assert not clients["failed"][0].startswith("node 1:")  # not the SuperLink's own id
    assert run.manifest(2)["extra"]["clients"]["aggregated"] == 3  # the rogue node never took part
    assert processes_with(MARKER, marker) == []
