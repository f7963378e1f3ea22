"""`dsl_fed simulate --ray-address`: the ClientApps run on a Ray cluster that was already running.

The cluster is two Ray nodes on this machine (a head and a worker, one CPU each, both on 127.0.0.1), started by
the test with a marker in their environment and stopped by process group; afterwards no process anywhere on the
machine carries the marker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import psutil
import pytest

from dsl_fed.errors import DslFedError
from dsl_fed.federated.runtime import executable
from dsl_fed.ray_env import check_ray_address, is_loopback, ray_environment
from flower_helpers import reap_marked, stop_group, write_config


@pytest.mark.parametrize("bad", ["6379", "host:", ":6379", "host:port", "10.0.0.5:70000", "10.0.0.5:0"])
def test_a_malformed_ray_address_is_one_line_naming_the_flag(bad):
    with pytest.raises(DslFedError, match=r"^--ray-address .*HOST:PORT"):
        check_ray_address(bad)


def test_a_private_or_loopback_ray_listens_on_loopback_and_a_remote_cluster_keeps_rays_default():
    assert ray_environment(None) == {"RAY_ADDRESS": "local", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    assert ray_environment("127.0.0.1:6379")["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert ray_environment("10.0.0.5:6379") == {"RAY_ADDRESS": "10.0.0.5:6379", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    assert is_loopback("localhost:1") and is_loopback("[::1]:1") and not is_loopback("head.example:1")


def test_simulate_refuses_a_bad_ray_address_before_anything_runs(tmp_path, demo_manifest):
    config = write_config(tmp_path, demo_manifest)
    done = subprocess.run([sys.executable, "-m", "dsl_fed", "simulate", str(config), "--ray-address", "nohost"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--ray-address 'nohost'" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_clientapps_run_on_both_hosts_of_an_existing_cluster_and_nothing_is_left(tmp_path, demo_manifest):
    """A head and a worker host (network namespaces on a private bridge, nothing routed out); `simulate` runs on
    the head's host. The ClientApp actors show up under both hosts' Ray processes."""
    from dsl_fed.deploy.netns import HostNetwork, unavailable_reason

    if reason := unavailable_reason():
        pytest.skip(f"network namespaces: {reason}")
    marker = f"dsl-fed-test-{uuid.uuid4().hex}"
    env = {**os.environ, "DSL_FED_RAY_TEST": marker, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # private: other Ray users never discover these nodes
    port = 6379
    config = write_config(tmp_path, demo_manifest, data={"shards": 2},
                          federated={"phase1_rounds": 1, "phase2_rounds": 1, "min_available_nodes": 2})
    seen: dict[int, set[str]] = {}
    nodes: list[subprocess.Popen] = []
    try:
        with HostNetwork(["head", "worker"]) as net:
            head = net["head"].address
            common = ["--num-cpus", "1", "--disable-usage-stats", "--block", "--temp-dir", temp_dir]
            nodes.append(_ray(net["head"].command([executable("ray"), "start", "--head", "--node-ip-address", head,
                                                   "--port", str(port), "--include-dashboard", "false", *common]),
                              env))
            _wait_for_nodes(net["head"].command, f"{head}:{port}", 1, env)
            nodes.append(_ray(net["worker"].command([executable("ray"), "start", "--address", f"{head}:{port}",
                                                     "--node-ip-address", net["worker"].address, *common]), env))
            _wait_for_nodes(net["head"].command, f"{head}:{port}", 2, env)
            stop = threading.Event()
            watcher = threading.Thread(target=_watch_actors, args=(nodes, seen, stop), daemon=True)
            watcher.start()
            done = subprocess.run(net["head"].command([sys.executable, "-m", "dsl_fed", "simulate", str(config),
                                                       "--ray-address", f"{head}:{port}"]),
                                  env=env, capture_output=True, text=True, timeout=600)
            stop.set()
            watcher.join()
            for node in reversed(nodes):
                stop_group(node)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"on the Ray cluster at {head}:{port}" in done.stderr
        assert (tmp_path / "runs" / "fed" / "round_2" / "model.tflite").is_file()
        assert all(seen.get(node.pid) for node in nodes), seen  # under each host's raylet, not a private Ray
    finally:
        for node in nodes:
            stop_group(node)
        left = reap_marked(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert left == [], f"processes of this test survived: {left}"


def _ray(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for_nodes(on_head, address: str, count: int, env: dict[str, str], timeout: float = 90) -> None:
    """Until `ray status` on the head's host lists `count` active nodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run(on_head([executable("ray"), "status", "--address", address]), env=env,
                                capture_output=True, text=True).stdout
        active = status.partition("Active:")[2].partition("Pending:")[0]
        if active.count("node_") >= count:
            return
        time.sleep(1)
    raise AssertionError(f"the Ray cluster at {address} never had {count} active node(s)")


def _watch_actors(nodes: list[subprocess.Popen], seen: dict[int, set[str]], stop: threading.Event) -> None:
    """Record, per node, the Ray worker process titles under it that name Flower's ClientApp actor."""
    while not stop.is_set():
        for node in nodes:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(node.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        title = " ".join(child.cmdline())
                        if "ClientAppActor" in title:
                            seen.setdefault(node.pid, set()).add(title[:80])
        time.sleep(0.5)
