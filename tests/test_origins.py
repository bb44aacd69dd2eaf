"""Which browsers' requests the bridge serves (rest_bridge/origins.py), over HTTP as a page's
requests arrive: CORS, the JSON content type, the Host. The same rules in a real browser:
tests/browser/test_origins.py."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from rest_bridge.origins import allowed_hosts, host_name, is_loopback
from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, EchoSystem
from tests.test_tokenize_flags_auth import preflight

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def test_no_foreign_origin_by_default(echo_system: EchoSystem) -> None:
    reply = httpx.get(f"{echo_system.url}/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers
    refused = preflight(echo_system.url, "http://evil.example")
    assert refused.status_code >= 400 and "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize("value", ["*", '["*"]'])
def test_fastchat_star_allows_every_origin(echo_system: EchoSystem, value: str) -> None:
    bridge = harness.bridge(echo_system.grpc_address, "--allowed-origins", value)
    try:
        url = f"http://{bridge.address}"
        reply = httpx.get(f"{url}/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
        assert reply.headers["access-control-allow-origin"] == "*"
        assert preflight(url, "http://evil.example").status_code == 200
    finally:
        bridge.stop()


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "text/json"]
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"])
def test_a_body_that_is_not_declared_json_is_415(echo_system: EchoSystem, path: str, content_type: str | None) -> None:
    before = sum(harness.worker_stats(w.address).requests_total for w in echo_system.chat_workers)
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    body = b'{"model": "echo-chat", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}'
    reply = httpx.post(f"{echo_system.url}{path}", content=body, headers=headers)
    assert reply.status_code == 415, reply.text
    assert reply.json()["error"]["code"] == "unsupported_media_type"
    assert sum(harness.worker_stats(w.address).requests_total for w in echo_system.chat_workers) == before


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"]
)
def test_json_content_types_are_accepted(echo_system: EchoSystem, content_type: str) -> None:
    reply = httpx.post(
        f"{echo_system.url}/v1/chat/completions",
        content=b'{"model": "echo-chat", "messages": [{"role": "user", "content": "hi"}]}',
        headers={**AUTH, "Content-Type": content_type},
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "0.0.0.0:8000", "192.168.1.5"])
def test_a_foreign_host_is_refused_on_a_loopback_bind(echo_system: EchoSystem, host: str) -> None:
    for request in (
        lambda h: httpx.get(f"{echo_system.url}/v1/models", headers={**AUTH, "Host": h}),
        lambda h: httpx.post(f"{echo_system.url}/v1/chat/completions", json=CHAT, headers={**AUTH, "Host": h}),
        lambda h: httpx.get(f"{echo_system.url}/", headers={"Host": h}),
    ):
        reply = request(host)
        assert reply.status_code == 403, reply.text
        assert reply.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:8000", "app.localhost:1", "127.0.0.1", "127.0.0.2:80", "[::1]:8000"]
)
def test_loopback_names_are_served(echo_system: EchoSystem, host: str) -> None:
    assert httpx.get(f"{echo_system.url}/v1/models", headers={**AUTH, "Host": host}).status_code == 200


@pytest.fixture(scope="module")
def named_bridge(echo_system: EchoSystem) -> Iterator[str]:
    bridge = harness.bridge(echo_system.grpc_address, "--allowed-hosts", '["tokenwire.lan"]')
    yield f"http://{bridge.address}"
    bridge.stop()


def test_allowed_hosts_adds_names(named_bridge: str) -> None:
    for host, status in (("tokenwire.lan:8000", 200), ("localhost", 200), ("other.lan", 403)):
        assert httpx.get(f"{named_bridge}/v1/models", headers={**AUTH, "Host": host}).status_code == status, host


def test_which_binds_check_the_host() -> None:
    assert allowed_hosts("127.0.0.1", []) == frozenset()  # loopback names only
    assert allowed_hosts("::1", ["a.lan"]) == {"a.lan"}
    assert allowed_hosts("0.0.0.0", []) is None  # a public bind: any name, unless told
    assert allowed_hosts("192.168.1.5", ["Box.LAN."]) == {"box.lan"}
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    assert [host_name(h) for h in ("a:1", "[::1]:8", "b", "::1")] == ["a", "::1", "b", "::1"]
    assert not is_loopback("localhost.example") and is_loopback("[::1]")
