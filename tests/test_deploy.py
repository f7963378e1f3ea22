"""A real Flower deployment on 127.0.0.1: SuperLink + SuperNodes as separate processes, TLS, node authentication.

Slow (each federation costs ~20-60 s of Flower start-up on 2 cores). Every process started gets an environment
marker unique to the test; afterwards no process anywhere on the machine may carry it.
"""

from __future__ import annotations

import csv
import uuid

import pytest
from flower_helpers import write_config

from dsl_fed.deploy.local import deploy_local
from dsl_fed.federated.checkpoint import RunDirectory
from dsl_fed.federated.watchdog import processes_with

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
