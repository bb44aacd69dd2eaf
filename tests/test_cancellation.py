"""A client that goes away stops generation on the worker and frees its slot."""

from __future__ import annotations

import grpc
import httpx

from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, EchoSystem
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

AUTH = (("authorization", f"Bearer {API_KEY}"),)


def totals(system: EchoSystem) -> dict[str, int]:
    stats = [harness.worker_stats(w.address) for w in system.chat_workers]
    return {
        "in_flight": sum(s.in_flight for s in stats),
        "cancelled": sum(s.cancelled_total for s in stats),
        "after_cancel_max": max(s.tokens_after_cancel_max for s in stats),
    }


def settled(system: EchoSystem, cancelled: int) -> dict[str, int]:
    return harness.wait_until(lambda: (t := totals(system))["in_flight"] == 0 and t["cancelled"] >= cancelled and t)


async def test_grpc_cancel_stops_the_worker(slow_system: EchoSystem) -> None:
    before = totals(slow_system)["cancelled"]
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
    after = settled(slow_system, before + 1)
    assert after["cancelled"] == before + 1
    assert after["after_cancel_max"] <= 1


def test_http_disconnect_stops_the_worker(slow_system: EchoSystem) -> None:
    before = totals(slow_system)["cancelled"]
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "long story"}], "stream": True}
    with httpx.Client(base_url=slow_system.url, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            lines = reply.iter_lines()
            for _ in range(6):
                next(lines)
        # Leaving the block closes the connection mid-stream.
    after = settled(slow_system, before + 1)
    assert after["after_cancel_max"] <= 1


def test_http_disconnect_cancels_a_unary_request(slow_system: EchoSystem) -> None:
    before = totals(slow_system)["cancelled"]
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "long story"}]}
    try:
        httpx.post(
            f"{slow_system.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=0.5,  # 200 tokens x 20 ms = 4 s: the client gives up first
        )
    except httpx.TimeoutException:
        pass
    after = settled(slow_system, before + 1)
    assert after["after_cancel_max"] <= 1
