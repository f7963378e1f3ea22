"""Through Flower's simulation engine (SuperLink, SuperExec, Ray): `dsl_fed simulate`, `--resume`, `flwr run .`.

Slow (a Flower run costs ~20 s of start-up on 2 cores before any training). Every test checks that the
processes it started (SuperLink, SuperExec, simulation, Ray) are gone afterwards.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flower_helpers import processes_with, saved_weights, write_config

from dsl_fed.cli.federated import simulate
from dsl_fed.export import read_export_manifest
from dsl_fed.federated.checkpoint import RunDirectory
from dsl_fed.federated.runtime import descendants, executable, free_port, terminate_tree
from dsl_fed.ray_env import ray_environment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def simulated(demo_manifest, tmp_path_factory):
    """`dsl_fed simulate`: 3 clients (speaker shards), 2 + 1 rounds, tiny backbone, demo corpus."""
    folder = tmp_path_factory.mktemp("simulate")
    config = write_config(folder, demo_manifest, federated={"local_epochs": 12})
    lines: list[str] = []
    run_dir = simulate(config, echo=lines.append)
    leftovers = descendants(os.getpid())
    return config, run_dir, lines, leftovers


def test_three_clients_two_plus_one_rounds_beat_chance_and_publish_every_round(simulated):
    _, run_dir, lines, leftovers = simulated
    assert leftovers == []  # SuperLink, SuperExec, simulation and Ray are all gone
    run = RunDirectory(run_dir)
    assert run.latest_round() == 3
    for k, phase in ((1, 1), (2, 1), (3, 2)):
        manifest = read_export_manifest(run.round_dir(k) / "model.tflite")  # checks the file's sha256
        assert (manifest.extra["round"], manifest.extra["phase"]) == (k, phase)
        assert manifest.extra["clients"]["aggregated"] == 3 and manifest.extra["bytes_up"] > 0
    devel = run.manifest(3)["extra"]["devel"]
    assert devel["uar"] > 1 / 3 + 0.1, devel  # 3 classes: chance is 1/3
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split(" |")[0] for line in rounds] == ["round 1/3 phase 1", "round 2/3 phase 1", "round 3/3 phase 2"]
    assert (run_dir / "logs" / "flower.log").stat().st_size > 0


def test_every_ray_actor_runs_tensorflow_with_the_client_thread_limit(simulated):
    """Ray forwards each ClientApp actor's log into the run's log: each reports the threads TensorFlow runs with."""
    _, run_dir, _, _ = simulated
    log = (run_dir / "logs" / "flower.log").read_text(errors="replace")
    reports = re.findall(r"ClientAppActor pid=(\d+)\D.*TensorFlow threads in process (\d+): (\d+) intra-op / (\d+) inter-op",
                         log)
    assert reports, "no ClientApp actor reported its TensorFlow threads"
    for actor, pid, intra, inter in reports:
        assert actor == pid and (intra, inter) == ("1", "1"), (actor, pid, intra, inter)  # federated.client_cpus: 1
    assert "cannot apply in this process" not in log


def test_resume_through_flower_gives_the_uninterrupted_round_3(simulated, tmp_path):
    config, run_dir, _, _ = simulated
    copy = tmp_path / "runs"
    shutil.copytree(run_dir, copy / run_dir.name, symlinks=True, ignore=shutil.ignore_patterns("logs"))
    shutil.rmtree(copy / run_dir.name / "round_3")  # the state of a run stopped after round 2
    (copy / run_dir.name / "latest").unlink()
    os.symlink("round_2", copy / run_dir.name / "latest")
    lines: list[str] = []
    resumed = simulate(config, [f"output.directory={copy}"], resume=True, echo=lines.append)
    assert descendants(os.getpid()) == []
    assert [line.split(" |")[0] for line in lines if line.startswith("round ")] == ["round 3/3 phase 2"]
    expected, got = saved_weights(run_dir / "round_3"), saved_weights(resumed / "round_3")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_two_keras_and_two_litert_clients_through_flower_and_ray(demo_manifest, tmp_path):
    """`dsl_fed simulate` with ``federated.litert_clients: 0.5``: Ray actors (TensorFlow loaded for the Keras nodes)
    start each LiteRT node's work in a worker process of its own, which reports the frameworks it loaded."""
    config = write_config(tmp_path, demo_manifest, data={"shards": 4},
                          federated={"litert_clients": 0.5, "phase1_rounds": 1, "phase2_rounds": 1,
                                     "min_available_nodes": 4})
    lines: list[str] = []
    run = RunDirectory(simulate(config, echo=lines.append))
    assert descendants(os.getpid()) == []
    for k, head_only in ((1, 0), (2, 2)):
        clients = read_export_manifest(run.round_dir(k) / "model.tflite").extra["clients"]
        assert (clients["aggregated"], clients["failed"], clients["head_only"]) == (4, [], head_only)
    log = re.sub(r"\x1b\[[0-9;]*m", "", (run.path / "logs" / "flower.log").read_text(errors="replace"))
    workers = re.findall(r"ClientAppActor pid=(\d+)\).*LiteRT worker pid (\d+) \(started by pid (\d+)\): train; "
                         r"frameworks loaded: (.*)", log)
    assert len(workers) == 4, workers  # 2 LiteRT nodes x 2 rounds
    actors_with_tensorflow = set(re.findall(r"TensorFlow threads in process (\d+)", log))
    for actor, worker, parent, frameworks in workers:
        assert frameworks == "none" and actor == parent != worker and actor in actors_with_tensorflow


def test_flwr_run_dot_on_the_quickstart_config_leaves_nothing_behind(demo_manifest, tmp_path):
    """The README's `flwr run . local --stream` with a project FLWR_HOME and the managed local SuperLink."""
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # inherited by the SuperLink `flwr run` starts
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),  # private ports: never reuse someone's SuperLink
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        # a private Ray on loopback, never a cluster some `ray start` on this machine registered in /tmp/ray
        **ray_environment(None),
    }
    run_config = (f'data-manifest="{demo_manifest}" server-eval-manifest="{demo_manifest}" '
                  f'output-directory="{tmp_path / "runs"}" '
                  'overrides="federated.phase1_rounds=1 federated.phase2_rounds=0 federated.local_epochs=1 data.shards=2"')
    pyproject = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    try:
        proc = subprocess.run(
            [executable("flwr"), "run", ".", "local", "--stream", "--run-config", run_config,
             "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
    finally:
        for pid in processes_with(str(home)):  # the managed SuperLink outlives `flwr run`: stop it by PID
            terminate_tree(pid)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[dsl_fed] round 1/1 phase 1" in proc.stdout
    run = RunDirectory(tmp_path / "runs" / "quickstart")
    assert run.latest_round() == 1
    assert read_export_manifest(run.round_dir(1) / "model.tflite").extra["clients"]["aggregated"] == 2
    assert processes_with(str(home)) == [] and descendants(os.getpid()) == []
    assert not (home / "runtime-envs").exists()  # TensorFlow was not installed for the run
    assert hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest() == pyproject  # not rewritten
