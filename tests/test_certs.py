"""`deploy certs` names only what a certificate can name: IP addresses and ASCII host names (IDNs as A-labels)."""

from __future__ import annotations

import pytest

from dsl_fed.deploy.certs import check_host, write_certificates
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
