"""Separate hosts on one Linux machine: one network namespace per host, joined by a bridge in a namespace of its own.

A federation spread over these hosts talks only over their addresses (and each host's own loopback), as it would
across machines: a SuperNode cannot reach what the SuperLink's host binds to 127.0.0.1. Layout for hosts
``link, site0, site1``::

    <prefix>-lan    bridge br0; one veth end per host (h0, h1, ...), no address, no route anywhere
    <prefix>-link   eth0 10.213.0.1/24, lo
    <prefix>-site0  eth0 10.213.0.2/24, lo     ...

Nothing is created in the caller's namespace, so nothing is routed in or out and no name can clash with the
machine's own links. Closing ends every process still inside the namespaces (found by namespace, not by name)
and deletes them; their links go with them. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2's ``ip``.

A process killed outright (SIGKILL) cannot close: its namespaces stay. So `<prefix>` names the creating process,
``dslfed-<pid namespace>-<pid>-<start time>-<random>``, and each new `HostNetwork` first removes the namespaces
whose creator is gone (`remove_leftovers`): a PID that no longer exists, was reused by another process (other
start time) or is a zombie. Namespaces of a live process, of another PID namespace (whose processes cannot be
seen from here) or named otherwise are never touched.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

from dsl_fed.errors import DslFedError
from dsl_fed.federated.watchdog import end_processes

SUBNET = "10.213.0.0/24"  # private (RFC 1918), exists only inside the namespaces
_MADE_BY = re.compile(r"dslfed-(\d+)-(\d+)-(\d+)-[0-9a-f]+-")  # pid namespace, pid, start time; see the module


@dataclass(frozen=True)
class Host:
    """One host: its namespace and address; `command` runs a program on it."""

    name: str
    netns: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]


class HostNetwork:
    """Network namespaces for `hosts` (addresses .1, .2, ... of `subnet` in that order) on a private bridge.

    Use as a context manager: everything is made on entry (and removed again if making it fails) and removed
    on exit, also when the block raises.
    """

    def __init__(self, hosts: Sequence[str], subnet: str = SUBNET, prefix: str | None = None) -> None:
        net = ipaddress.ip_network(subnet)
        if len(set(hosts)) != len(hosts) or len(hosts) > net.num_addresses - 2:
            raise DslFedError(f"hosts {list(hosts)}: names must be unique and fit into {subnet}")
        self.prefix = prefix or f"dslfed-{creator()}-{secrets.token_hex(3)}"
        self.lan = f"{self.prefix}-lan"
        self.prefixlen = net.prefixlen
        self.hosts = {name: Host(name, f"{self.prefix}-{name}", str(net.network_address + i + 1))
                      for i, name in enumerate(hosts)}
        self._made: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def namespaces(self) -> list[str]:
        return [self.lan, *(host.netns for host in self.hosts.values())]

    def __enter__(self) -> "HostNetwork":
        remove_leftovers()
        try:
            self._add_netns(self.lan)
            _ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.lan, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts.values()):
                self._add_netns(host.netns)
                _ip("-n", self.lan, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                _ip("-n", self.lan, "link", "set", f"h{i}", "master", "br0", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/{self.prefixlen}", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def processes(self) -> list[psutil.Process]:
        """Every live process inside one of the namespaces."""
        return _processes_inside(self._made)

    def close(self) -> None:
        """End the processes inside the namespaces, then delete the namespaces (their links go with them)."""
        made, self._made = list(reversed(self._made)), []
        _delete(made)

    def _add_netns(self, name: str) -> None:
        self._made.append(name)  # first: a failed add may still leave it behind
        _ip("netns", "add", name)


def creator(pid: int | None = None) -> str:
    """``<pid namespace>-<pid>-<start time>`` of process `pid` (default: this one): names who made a namespace, so
    that a later process can tell whether its creator still runs (a reused PID has another start time)."""
    pid = pid or os.getpid()
    return f"{os.stat(f'/proc/{pid}/ns/pid').st_ino}-{pid}-{_start_ticks(pid)}"


def remove_leftovers() -> list[str]:
    """Delete the namespaces a `HostNetwork` made whose creating process is gone, after ending the processes still
    inside them; returns their names. Never touches another name, or one whose creator runs or cannot be seen
    from here (another PID namespace)."""
    ours = str(os.stat("/proc/self/ns/pid").st_ino)
    gone = []
    for name in existing_namespaces():
        made_by = _MADE_BY.match(name)
        if made_by is None or made_by[1] != ours:
            continue
        pid, start = int(made_by[2]), int(made_by[3])
        if _start_ticks(pid) != start:
            gone.append(name)
    _delete(gone)  # (one that another process removes meanwhile is no failure)
    return gone


def existing_namespaces() -> list[str]:
    """Names of the machine's named network namespaces (``ip netns list``)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can): tried with a throw-away namespace."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"dslfed-{creator()}-{secrets.token_hex(3)}-probe"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"`ip netns add` failed (needs root / CAP_NET_ADMIN): {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None if it is gone or a zombie
    (killed, not yet reaped: it cleans up nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _processes_inside(namespaces: Sequence[str]) -> list[psutil.Process]:
    procs = []
    for name in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in map(int, pids):
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
    return procs


def _delete(namespaces: Sequence[str]) -> None:
    """End every process inside `namespaces`, then delete them (their links go with them)."""
    for _ in range(5):  # a dying parent may still spawn
        procs = _processes_inside(namespaces)
        if not procs:
            break
        end_processes(procs, grace=5.0)
    failed = []
    for name in namespaces:
        result = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
        if result.returncode != 0 and name in existing_namespaces():
            failed.append(f"{name}: {result.stderr.strip()}")
    if failed:
        raise DslFedError(f"could not delete network namespaces: {'; '.join(failed)}")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise DslFedError(f"ip {' '.join(args)}: {result.stderr.strip() or f'exit {result.returncode}'}")
