"""`dsl_fed deploy certs` and `deploy keygen`: what TLS and SuperNode authentication need, written with `cryptography`.

`deploy certs DIR` (the operator) writes::

    ca.crt  ca.key                 a private certificate authority (ECDSA P-384); give ca.crt to every
                                   SuperNode and to the machine running `flwr run`, keep ca.key offline
    server.crt  server.key         the SuperLink's certificate, valid for the given host names / IP addresses
    server.pem                     server.crt + server.key in one file, for a TLS proxy in front of the SuperLink
    node_<k>  node_<k>.pub         only with --nodes K: SuperNode key pairs made by the operator (who then holds
                                   the sites' private keys; `deploy keygen` avoids that)

`deploy keygen DIR` (a site) writes ``node_key`` and ``node_key.pub``: the SuperNode's key pair in OpenSSH format
(ECDSA P-384), what Flower's node authentication expects. The SuperNode reads the private key; the site sends
the public one to the operator, who registers it with `flwr supernode register`.

Private keys are written with mode 0600. An existing DIR with files in it is refused by `certs`, and `keygen`
never replaces a file, so keys that are in use are never replaced by accident.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from dsl_fed.errors import DslFedError
from dsl_fed.io import publish_folder

VALID_DAYS = 365
NODE_KEY = "node_key"  # `deploy keygen`: DIR/node_key (private, 0600) and DIR/node_key.pub
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def node_key(folder: str | Path, k: int) -> Path:
    """Private key of SuperNode k (the public key is the same path + ``.pub``)."""
    return Path(folder) / f"node_{k}"


def write_certificates(folder: str | Path, hosts: Sequence[str], nodes: int = 0) -> Path:
    """Write a CA, the SuperLink's certificate for `hosts` and `nodes` SuperNode key pairs into `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not hosts:
        raise DslFedError("give at least one --host (a name or IP address the SuperNodes use to reach the SuperLink)")
    for host in hosts:
        check_host(host)
    if nodes < 0:
        raise DslFedError(f"--nodes must be >= 0, got {nodes}")
    folder = Path(folder).absolute()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DslFedError(f"{folder}: exists and is not empty; keys there may be in use (nothing was written)")

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: x509.Name, issuer_key, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA384())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsl_fed federation CA")])
    ca = certificate("dsl_fed federation CA", ca_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), True),
    ])
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = certificate(hosts[0], server_key, ca_name, ca_key, [
        (x509.SubjectAlternativeName([_san(h) for h in hosts]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ])
    pem = serialization.Encoding.PEM
    private = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                   encryption_algorithm=serialization.NoEncryption())

    def write(target: Path) -> None:  # a hidden folder, renamed onto `folder` when complete
        _write(target / "ca.crt", ca.public_bytes(pem))
        _write(target / "ca.key", ca_key.private_bytes(**private), secret=True)
        _write(target / "server.crt", server.public_bytes(pem))
        _write(target / "server.key", server_key.private_bytes(**private), secret=True)
        _write(target / "server.pem", server.public_bytes(pem) + server_key.private_bytes(**private), secret=True)
        for k in range(nodes):
            private_key, public_line = _node_key_pair(f"dsl_fed-node_{k}")
            _write(node_key(target, k), private_key, secret=True)
            _write(Path(f"{node_key(target, k)}.pub"), public_line)

    publish_folder(folder, write)
    return folder


def write_node_key(folder: str | Path) -> tuple[Path, str]:
    """Make a SuperNode key pair in `folder` (created if missing); returns the private key's path and the public
    key line (``ecdsa-sha2-nistp384 AAAA... dsl_fed-<folder name>``) to register.

    Raises:
        DslFedError: `folder` is a file, or either key file exists already (nothing is written then).
    """
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise DslFedError(f"{folder}: is a file, not a folder")
    private_path, public_path = folder / NODE_KEY, folder / f"{NODE_KEY}.pub"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise DslFedError(f"{path}: exists; a SuperNode may be using it (nothing was written; move it away "
                              "to make a new key)")
    private_key, public_line = _node_key_pair("dsl_fed-" + (re.sub(r"[^A-Za-z0-9._-]", "_", folder.name) or "node"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _write(private_path, private_key, secret=True)
    except FileExistsError:
        raise DslFedError(f"{private_path}: exists; a SuperNode may be using it (nothing was written)") from None
    try:
        _write(public_path, public_line)
    except FileExistsError:
        private_path.unlink()  # ours, written a moment ago: no half pair is left behind
        raise DslFedError(f"{public_path}: exists; a SuperNode may be using it (nothing was written)") from None
    return private_path, public_line.decode().strip()


def _node_key_pair(comment: str) -> tuple[bytes, bytes]:
    """An ECDSA P-384 key: (OpenSSH private key, OpenSSH public key line with `comment`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def check_host(host: str) -> None:
    """Refuse what a certificate cannot name: a host is an IP address or an ASCII DNS name (an IDN as A-label)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not host.strip():
        raise DslFedError(f"--host {host!r}: empty; give the name or IP address the SuperNodes use to reach the SuperLink")
    if not host.isascii():
        try:
            a_label = host.encode("idna").decode("ascii")
        except UnicodeError:
            a_label = None
        hint = f"; write it as {a_label!r} (its ASCII A-label form)" if a_label else ""
        raise DslFedError(f"--host {host!r}: not an ASCII host name{hint}")
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if labels[0] == "*":  # a wildcard certificate for the subdomains
        labels = labels[1:]
    if len(name) > 253 or not labels or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise DslFedError(f"--host {host!r}: not a valid host name or IP address (a host name is dot-separated labels "
                          "of letters, digits and '-', each at most 63 characters)")


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
