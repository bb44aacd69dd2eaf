"""The address rules (common/addresses.py): host:port both ways, IPv6 literals, wildcards."""

from __future__ import annotations

import pytest

from common import addresses


@pytest.mark.parametrize(
    ("host", "port", "address"),
    [("127.0.0.1", 50051, "127.0.0.1:50051"), ("::1", 8000, "[::1]:8000"), ("example.org", "0", "example.org:0")],
)
def test_join_and_split(host: str, port: int | str, address: str) -> None:
    assert addresses.join(host, port) == address
    assert addresses.split(address) == (host, int(port))


def test_split_a_bare_ipv6_literal_on_its_last_colon() -> None:
    assert addresses.split(":::50051") == ("::", 50051)


@pytest.mark.parametrize("address", ["localhost", "localhost:", "localhost:http"])
def test_split_wants_a_port(address: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        addresses.split(address)


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("0.0.0.0", "127.0.0.1:9"),
        ("::", "127.0.0.1:9"),
        ("", "127.0.0.1:9"),
        ("10.1.2.3", "10.1.2.3:9"),
        ("::1", "[::1]:9"),
    ],
)
def test_a_wildcard_is_reached_on_loopback(host: str, local: str) -> None:
    assert addresses.local(host, 9) == local


def test_fastchat_urls_become_host_port() -> None:
    assert addresses.from_url("http://localhost:21001/") == "localhost:21001"
    assert addresses.from_url("localhost:21001") == "localhost:21001"
    assert addresses.from_url(None) is None
