"""Separate hosts on one machine: the SuperLink's host (also the operator's) and 3 sites, each in its own network
namespace on a private bridge, over TLS with node authentication; every site makes its own key; the sites reach
the Fleet API (through `fleet_proxy.cfg`) but neither the Control API nor the ServerAppIo API.

The steps are the README's "Deploy across machines" commands. Needs root (network namespaces) and haproxy; skipped
with the reason otherwise. Every process started carries a marker; afterwards no process, namespace or link of the
test may be left.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from flower_helpers import write_config

from dsl_fed.federated.watchdog import processes_with

pytestmark = pytest.mark.slow

MARKER = "DSL_FED_TEST_MULTIHOST"
FEDERATED = {"phase1_rounds": 1, "phase2_rounds": 1, "local_epochs": 1, "min_train_nodes": 3,
             "min_available_nodes": 3}
SUPERLINK_PORT, FLEET_PORT = 8000, 9092  # the README's


@pytest.fixture
def namespaces_or_skip():
    from dsl_fed.deploy.netns import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces cannot be created here: {reason}")
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run installs it)")


def root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


@pytest.mark.timeout(600)
def test_sites_on_their_own_hosts_train_through_the_fleet_proxy_and_cannot_reach_the_control_api(
        namespaces_or_skip, demo_manifest, tmp_path, capsys, monkeypatch):
    from dsl_fed.cli import main as dsl_fed
    from dsl_fed.deploy.local import LoopbackFederation
    from dsl_fed.deploy.netns import HostNetwork, existing_namespaces
    from dsl_fed.deploy.split import split_corpus
    from dsl_fed.federated.checkpoint import RunDirectory
    from dsl_fed.federated.run_config import run_config_toml, write_app
    from dsl_fed.federated.watchdog import guard

    started = time.monotonic()
    marker = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, marker)
    links_before = root_links()
    link, sites = tmp_path / "superlink", [tmp_path / f"site{k}" for k in range(3)]

    # Sites: each holds its own data and makes its own key; only node_key.pub leaves the site.
    for k, folder in enumerate(split_corpus(demo_manifest, tmp_path / "split", nodes=3)):
        sites[k].mkdir()
        folder.rename(sites[k] / "data")
    (link / "keys").mkdir(parents=True)
    for k, site in enumerate(sites):
        capsys.readouterr()
        assert dsl_fed(["deploy", "keygen", str(site)]) == 0
        assert capsys.readouterr().out.startswith("ecdsa-sha2-nistp384 ")
        shutil.copy(site / "node_key.pub", link / "keys" / f"site{k}.pub")

    with guard() as run_marker, HostNetwork(["superlink", "site0", "site1", "site2"]) as net:
        server = net["superlink"].address  # 10.213.0.1
        # Operator, on the SuperLink's host: CA + a certificate naming the address the sites dial, and the names
        # the SuperLink has on its own host (127.0.0.1 for `flwr` and the ServerApp, localhost for the proxy).
        assert dsl_fed(["deploy", "certs", str(link / "certs"), "--host", server, "--host", "127.0.0.1",
                        "--host", "localhost"]) == 0
        assert not any(link.rglob("*.wav")) and not (link / "certs" / "node_0").exists()
        config = write_config(link, demo_manifest, federated=FEDERATED)
        hosts = {"superlink": net["superlink"], **{f"node_{k}": net[f"site{k}"] for k in range(3)}}
        fed = LoopbackFederation(link / "work", link / "certs", [site / "data" for site in sites],
                                 port=SUPERLINK_PORT, env=run_marker, node_keys=[site / "node_key" for site in sites],
                                 hosts=hosts, fleet_address=f"{server}:{FLEET_PORT}")
        with fed:
            fed.start_superlink()
            fed.start_fleet_proxy(f"{server}:{FLEET_PORT}")
            # A site with the CA certificate tries the Control API through the proxy and at the SuperLink's port.
            intruder = intrude(net["site0"], sites[0], link / "certs" / "ca.crt", server, fed.env)
            with ThreadPoolExecutor(3) as pool:  # the operator registers the sites' public keys; they start
                list(pool.map(lambda k: (fed.register(k, public_key=link / "keys" / f"site{k}.pub"),
                                         fed.start_node(k)), range(3)))
            run_config = link / "run_config.toml"
            run_config.write_text(run_config_toml(config, ["data.classes=falling,flat,rising"], link / "runs", False))
            lines: list[str] = []
            submitted = time.monotonic()
            # the ServerApp waits for min_available_nodes (3) itself
            assert fed.run(write_app(link / "app"), run_config, lines.append) == 0
            finished = time.monotonic()
            refused = {name: proc.communicate(timeout=120)[0] for name, proc in intruder.items()}
            codes = {name: proc.returncode for name, proc in intruder.items()}
            proxy_log = (fed.logs / "fleet_proxy.log").read_text()
            node_logs = [(fed.logs / f"node_{k}.log").read_text() for k in range(3)]
        namespaces = net.namespaces()
        net_addresses = {name: host.address for name, host in net.hosts.items()}
    elapsed = time.monotonic() - started

    # The sites were refused: 403 from the proxy for the Control API, nothing listening on the SuperLink's port.
    assert codes == {"register via proxy": 1, "run via proxy": 1, "register at :8000": 1, "paths via proxy": 0}, refused
    for name in ("register via proxy", "run via proxy"):
        assert "403 Forbidden" in refused[name], refused[name]
    assert refused["paths via proxy"].split() == [word for path in SNEAKY_PATHS for word in (path, "403")]
    assert all(line.split('"')[1].split()[1].startswith(("/v1/fleet/", "/health"))
               for line in proxy_log.splitlines() if " 200 " in line)
    assert "Connection to the SuperLink is unavailable" in refused["register at :8000"], refused["register at :8000"]
    # ... while the operator's registrations and run worked, and the sites trained through the proxy.
    assert {line.split(":")[0] for line in proxy_log.splitlines() if "/v1/fleet/push-messages" in line} == {
        net_addresses[f"site{k}"] for k in range(3)}
    assert all("SuperNode ID" in log for log in node_logs)
    run = RunDirectory(link / "runs" / "fed")
    assert run.latest_round() == 2
    for k in (1, 2):
        extra = run.manifest(k)["extra"]
        assert extra["clients"]["aggregated"] == 3
        assert extra["evaluation"]["kind"] == "federated" and extra["evaluation"]["nodes"] == 2
    # Nothing is left: processes, namespaces, links.
    assert processes_with(MARKER, marker) == []
    assert set(namespaces) & set(existing_namespaces()) == set()
    assert root_links() == links_before
    print(f"multi-host federation: {elapsed:.0f} s (set-up {submitted - started:.0f} s, "
          f"run {finished - submitted:.0f} s, teardown and checks {elapsed - (finished - started):.0f} s)")


# The ServerAppIo API, the API docs, and the Control API behind dot segments (raw and percent-encoded)
SNEAKY_PATHS = ["/v1/runtime/get-nodes", "/docs", "/v1/fleet/../control/list-runs",
                "/v1/fleet/%2e%2e/control/list-runs"]
_POST = """
import ssl, sys, urllib.error, urllib.request
context = ssl.create_default_context(cafile=sys.argv[1])
for path in sys.argv[3:]:
    try:
        print(path, urllib.request.urlopen(urllib.request.Request(sys.argv[2] + path, b"", method="POST"),
                                           context=context, timeout=10).status)
    except urllib.error.HTTPError as error:
        print(path, error.code)
"""


def intrude(site, folder, ca, server, env) -> dict[str, subprocess.Popen]:
    """`flwr supernode register` and `flwr run` from a site's host, through the proxy and at the SuperLink's own
    port, with the site's own key and the CA certificate; started at once, collected later."""
    from dsl_fed.federated.run_config import write_app
    from dsl_fed.federated.runtime import executable

    home = folder / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.proxy]\naddress = "{server}:{FLEET_PORT}"\nroot-certificates = "{ca}"\n\n'
        f'[superlink.direct]\naddress = "{server}:{SUPERLINK_PORT}"\nroot-certificates = "{ca}"\n')
    app = write_app(folder / "app")
    flwr = executable("flwr")
    commands = {
        "register via proxy": [flwr, "supernode", "register", str(folder / "node_key.pub"), "proxy"],
        "run via proxy": [flwr, "run", str(app), "proxy"],
        "register at :8000": [flwr, "supernode", "register", str(folder / "node_key.pub"), "direct"],
        "paths via proxy": [sys.executable, "-c", _POST, str(ca), f"https://{server}:{FLEET_PORT}", *SNEAKY_PATHS],
    }
    return {name: subprocess.Popen(site.command(cmd), env={**env, "FLWR_HOME": str(home)}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
            for name, cmd in commands.items()}
