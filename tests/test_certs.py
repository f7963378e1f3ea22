"""`deploy certs` names only what a certificate can name (IP addresses, ASCII host names, IDNs as A-labels) and makes
node keys only on request; `deploy keygen` makes a site's key pair in the format Flower expects, never over a file."""

from __future__ import annotations

import pytest

from dsl_fed.deploy.certs import check_host, write_certificates, write_node_key
from dsl_fed.errors import DslFedError


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "superlink", "fl.example.org", "xn--mnchen-3ya.example",
                                  "*.example.org", "host-1.local."])
def test_ip_addresses_and_host_names_are_accepted(host):
    check_host(host)


@pytest.mark.parametrize("host,message", [
    ("", "--host '': empty"),
    ("bad host!", "--host 'bad host!': not a valid host name or IP address"),
    ("münchen.example", "not an ASCII host name; write it as 'xn--mnchen-3ya.example'"),
    ("-dash.example", "not a valid host name"),
    ("a..b", "not a valid host name"),
    ("x" * 64 + ".example", "not a valid host name"),
])
def test_invalid_hosts_are_one_line_and_nothing_is_written(tmp_path, host, message):
    with pytest.raises(DslFedError, match=message.replace("*", r"\*")) as info:
        write_certificates(tmp_path / "certs", ["127.0.0.1", host], 1)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "certs").exists()


def test_certs_make_node_keys_only_on_request_and_a_0600_pem_for_the_proxy(tmp_path):
    from cryptography import x509

    folder = write_certificates(tmp_path / "certs", ["10.213.0.1", "127.0.0.1", "localhost"])
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key", "server.pem"]
    pem = (folder / "server.pem").read_bytes()
    assert pem == (folder / "server.crt").read_bytes() + (folder / "server.key").read_bytes()
    assert (folder / "server.pem").stat().st_mode & 0o777 == 0o600
    names = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in names.get_values_for_type(x509.IPAddress)] == ["10.213.0.1", "127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    more = write_certificates(tmp_path / "more", ["127.0.0.1"], 2)
    assert sorted(p.name for p in more.iterdir() if "node" in p.name) == ["node_0", "node_0.pub", "node_1", "node_1.pub"]


def test_keygen_writes_a_0600_private_key_and_the_public_key_flower_registers(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    private, line = write_node_key(tmp_path / "site 1")  # made if missing
    assert private == tmp_path / "site 1" / "node_key"
    assert private.stat().st_mode & 0o777 == 0o600
    public = tmp_path / "site 1" / "node_key.pub"
    assert public.stat().st_mode & 0o022 == 0  # readable, written only by its owner
    assert public.read_text() == line + "\n"
    kind, blob, comment = line.split(" ")
    assert (kind, comment) == ("ecdsa-sha2-nistp384", "dsl_fed-site_1")
    # what `flower-supernode --auth-supernode-private-key` and `flwr supernode register` load
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(public) == public_key_to_bytes(key.public_key())
    assert write_node_key(tmp_path / "site 2")[1] != line  # a new key each time


@pytest.mark.parametrize("existing", ["node_key", "node_key.pub"])
def test_keygen_never_replaces_a_file(tmp_path, existing):
    (tmp_path / existing).write_text("a key in use\n")
    with pytest.raises(DslFedError, match=f"{existing}: exists; a SuperNode may be using it") as info:
        write_node_key(tmp_path)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_text() == "a key in use\n"


def test_keygen_cli_prints_only_the_public_key_and_refuses_a_second_run(tmp_path, capsys):
    from dsl_fed.cli import main

    assert main(["deploy", "keygen", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert out == (tmp_path / "site" / "node_key.pub").read_text()
    assert main(["deploy", "keygen", str(tmp_path / "site")]) == 2
    assert "node_key: exists" in capsys.readouterr().err
    assert (tmp_path / "site" / "node_key.pub").read_text() == out
