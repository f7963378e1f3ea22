"""Hosts in network namespaces reach each other only over their private addresses, and nothing they were made of
(namespace, link, process) outlives the block, also when the block or the making fails. Needs root."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from dsl_fed.deploy import netns
from dsl_fed.deploy.netns import HostNetwork, existing_namespaces
from dsl_fed.errors import DslFedError
from dsl_fed.federated.watchdog import processes_with

MARKER = "DSL_FED_TEST_NETNS"

# Listens on every address of its host, answers one connection with its host's name.
_SERVE = """
import socket, sys
with socket.create_server(("0.0.0.0", 7000)) as server:
    print("listening", flush=True)
    connection, _ = server.accept()
    connection.sendall(sys.argv[1].encode())
"""
_ASK = """
import socket, sys
for address in sys.argv[1:]:
    try:
        with socket.create_connection((address, 7000), timeout=2) as connection:
            print(address, connection.recv(100).decode())
    except OSError as error:
        print(address, type(error).__name__)
"""


@pytest.fixture(autouse=True)
def namespaces_or_skip():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces cannot be created here: {reason}")


def root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def test_hosts_reach_each_other_over_their_addresses_only_and_everything_goes_with_the_block():
    links = root_links()
    with HostNetwork(["a", "b"]) as net:
        assert (net["a"].address, net["b"].address) == ("10.213.0.1", "10.213.0.2")
        server = subprocess.Popen(net["a"].command([sys.executable, "-c", _SERVE, "a"]), stdout=subprocess.PIPE,
                                  text=True)
        assert server.stdout.readline() == "listening\n"
        # b's 127.0.0.1 is its own: a's server is not there; no route leads off the bridge
        asked = subprocess.run(net["b"].command([sys.executable, "-c", _ASK, "127.0.0.1", "192.0.2.1",
                                                 net["a"].address]), capture_output=True, text=True, check=True)
        assert asked.stdout.splitlines() == ["127.0.0.1 ConnectionRefusedError", "192.0.2.1 OSError",
                                            f"{net['a'].address} a"]
        routes = subprocess.run(net["b"].command(["ip", "route"]), capture_output=True, text=True).stdout
        assert [line.split()[0] for line in routes.splitlines()] == ["10.213.0.0/24"]
        assert root_links() == links  # nothing was made in this namespace
        made = net.namespaces()
        assert set(made) <= set(existing_namespaces())
        server.wait(timeout=10)
    assert set(made) & set(existing_namespaces()) == set()
    assert root_links() == links


def test_processes_inside_are_ended_when_the_block_fails(monkeypatch):
    marker = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, marker)
    with pytest.raises(RuntimeError, match="the test failed"):
        with HostNetwork(["a", "b"]) as net:
            made = net.namespaces()
            sleepers = [subprocess.Popen(net[h].command(["sh", "-c", "sleep 600 & sleep 600"]), start_new_session=True)
                        for h in ("a", "b")]
            deadline = time.monotonic() + 10
            while len(processes_with(MARKER, marker)) < 6:  # sh and two sleeps on each host
                assert time.monotonic() < deadline, processes_with(MARKER, marker)
                time.sleep(0.05)
            raise RuntimeError("the test failed")
    for sleeper in sleepers:
        sleeper.wait(timeout=10)  # ended (not left running for 600 s)
    assert processes_with(MARKER, marker) == []
    assert set(made) & set(existing_namespaces()) == set()


def test_a_failure_while_making_the_hosts_removes_what_was_made(monkeypatch):
    calls = []
    real = netns._ip

    def failing(*args):
        calls.append(args)
        if args[:3] == ("-n", "dslfed-test-b", "addr"):  # second host, half made
            raise DslFedError("ip addr add: simulated failure")
        real(*args)

    monkeypatch.setattr(netns, "_ip", failing)
    net = HostNetwork(["a", "b", "c"], prefix="dslfed-test")
    with pytest.raises(DslFedError, match="simulated failure"):
        with net:
            pass
    assert ("netns", "add", "dslfed-test-b") in calls and ("netns", "add", "dslfed-test-c") not in calls
    assert [n for n in existing_namespaces() if n.startswith("dslfed-test-")] == []


# Makes hosts in a child process, starts a sleeper inside, prints the namespaces and the sleeper's PID, then waits.
_MAKER = """
import subprocess, sys, time
from dsl_fed.deploy.netns import HostNetwork
net = HostNetwork(["a", "b"]).__enter__()
sleeper = subprocess.Popen(net["a"].command(["sleep", "600"]))
print(sleeper.pid, *net.namespaces(), flush=True)
time.sleep(600)
"""


def test_namespaces_of_a_killed_creator_are_removed_by_the_next_network_and_a_live_creators_are_kept():
    import psutil

    makers = [subprocess.Popen([sys.executable, "-c", _MAKER], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        (killed_sleeper, *killed), (live_sleeper, *live) = (maker.stdout.readline().split() for maker in makers)
        for maker, names in zip(makers, (killed, live)):
            assert all(name.startswith(f"dslfed-{netns.creator(maker.pid)}-") for name in names)
        makers[0].kill()  # SIGKILL: no clean-up; its namespaces and the sleeper inside stay
        makers[0].wait()
        assert set(killed) <= set(existing_namespaces()) and psutil.pid_exists(int(killed_sleeper))
        with HostNetwork(["c"], prefix="dslfed-test-sweep"):  # the next start removes them
            assert set(killed) & set(existing_namespaces()) == set()
            assert set(live) <= set(existing_namespaces())  # its creator still runs
            assert not psutil.pid_exists(int(killed_sleeper)) and psutil.pid_exists(int(live_sleeper))
        makers[1].kill()
        makers[1].wait()
        assert sorted(netns.remove_leftovers()) == sorted(live)
        assert not psutil.pid_exists(int(live_sleeper))
    finally:
        for maker in makers:
            maker.kill()
            maker.wait()
        netns.remove_leftovers()
