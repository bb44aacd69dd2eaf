"""A client that goes away stops generation on the worker and frees its slot.

The workers are the session's (``slow_system``), so every figure here is this
test's own: a counter read before and after, never the worker's lifetime
maximum, which any earlier test could have set."""

from __future__ import annotations

import asyncio
import json
import socket

import grpc
import httpx
import pytest

from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, EchoSystem
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

AUTH = (("authorization", f"Bearer {API_KEY}"),)


def totals(system: EchoSystem) -> dict[str, int]:
    stats = [harness.worker_stats(w.address) for w in system.chat_workers]
    return {
        "in_flight": sum(s.in_flight for s in stats),
        "cancelled": sum(s.cancelled_total for s in stats),
        "after_cancel": sum(s.tokens_after_cancel_total for s in stats),
    }


def settled(system: EchoSystem) -> dict[str, int]:
    """The totals once nothing runs: an earlier test's cancelled call may still be finishing."""
    return harness.wait_until(lambda: (t := totals(system))["in_flight"] == 0 and t, what="no call in flight")


def one_cancel(system: EchoSystem, before: dict[str, int]) -> int:
    """Once the worker has counted this test's one cancel: the tokens made after it."""
    after = harness.wait_until(
        lambda: (t := totals(system))["in_flight"] == 0 and t["cancelled"] > before["cancelled"] and t,
        what="the cancel counted",
    )
    assert after["cancelled"] == before["cancelled"] + 1
    return after["after_cancel"] - before["after_cancel"]


async def test_grpc_cancel_stops_the_worker(slow_system: EchoSystem) -> None:
    before = await asyncio.to_thread(settled, slow_system)
    async with grpc.aio.insecure_channel(slow_system.grpc_address) as channel:
        stub = api_pb2_grpc.InferenceServiceStub(channel)
        request = api_pb2.CreateChatCompletionRequest(
            model=CHAT_MODEL, messages=[common_pb2.ChatMessage(role="user", content="long story")]
        )
        call = stub.StreamChatCompletion(api_pb2.StreamChatCompletionRequest(request=request), metadata=AUTH)
        received = 0
        async for _ in call:
            received += 1
            if received == 5:
                call.cancel()
                break
    assert await asyncio.to_thread(one_cancel, slow_system, before) <= 1


def test_http_disconnect_stops_the_worker(slow_system: EchoSystem) -> None:
    before = settled(slow_system)
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "long story"}], "stream": True}
    with httpx.Client(base_url=slow_system.url, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            lines = reply.iter_lines()
            for _ in range(6):
                next(lines)
        # Leaving the block closes the connection mid-stream.
    assert one_cancel(slow_system, before) <= 1


def leave_while_waiting(system: EchoSystem, path: str, body: dict[str, object]) -> None:
    """A client that sends a request and goes away while a worker runs it, before any answer."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    host, port = system.bridge.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + payload)
        harness.wait_until(lambda: totals(system)["in_flight"] == 1, what="the call on a worker")
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # no answer yet: slow_system's take 4 s
            sock.recv(1)


def test_http_disconnect_cancels_a_unary_request(slow_system: EchoSystem) -> None:
    before = settled(slow_system)
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "long story"}]}
    leave_while_waiting(slow_system, "/v1/chat/completions", body)
    assert one_cancel(slow_system, before) <= 1
