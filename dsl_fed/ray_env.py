"""Which Ray a run uses, and on which addresses it listens: the environment handed to Ray's processes.

Ray picks its cluster from ``RAY_ADDRESS`` when `ray.init` gets no address (Flower's simulation never passes
one), so naming a cluster there is how a simulation's ClientApps reach an existing one. A private Ray on this
machine stays on loopback: by default Ray resolves the machine's outward address for its node (even when told
127.0.0.1) and its servers listen on every interface; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read when Ray is
imported) makes it take 127.0.0.1 and bind there. A cluster on other machines needs the outward address, so it
keeps Ray's default.
"""

from __future__ import annotations

import ipaddress

from dsl_fed.errors import DslFedError

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def check_ray_address(address: str, key: str = "--ray-address") -> str:
    """`address` if it is ``HOST:PORT`` (port 1-65535), else one error line naming `key`."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DslFedError(f"{key} {address!r}: expected HOST:PORT of a running Ray head (`ray start --head` "
                          "prints it), e.g. 10.0.0.5:6379")
    return address


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ray_environment(address: str | None) -> dict[str, str]:
    """Environment for the processes that start or join Ray: a private local Ray (None) or the cluster at `address`."""
    if address is None:
        return {"RAY_ADDRESS": "local", LOOPBACK_ONLY: "0"}
    check_ray_address(address)
    return {"RAY_ADDRESS": address, LOOPBACK_ONLY: "0" if is_loopback(address) else "1"}
