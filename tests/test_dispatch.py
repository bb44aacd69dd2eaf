"""Dispatch over live workers: spread, failover, and a clear 503 with none."""

from __future__ import annotations

import asyncio
import signal

import grpc
import openai
import pytest

from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, EchoSystem, start_echo_system, stop_system
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture
def system():
    # Each test here stops workers, so each gets its own system.
    system = start_echo_system(delay=0.01)
    yield system
    stop_system(system)


def requests_served(system: EchoSystem) -> list[int]:
    return [harness.worker_stats(w.address).requests_total for w in system.chat_workers]


async def chat_many(system: EchoSystem, count: int) -> list[api_pb2.CreateChatCompletionResponse]:
    async with grpc.aio.insecure_channel(system.grpc_address) as channel:
        stub = api_pb2_grpc.InferenceServiceStub(channel)
        request = api_pb2.CreateChatCompletionRequest(
            model=CHAT_MODEL, messages=[common_pb2.ChatMessage(role="user", content="spread me")], max_tokens=8
        )
        # A deadline so that a request left hanging fails here, not at the suite's timeout.
        return await asyncio.gather(
            *(stub.CreateChatCompletion(request, metadata=AUTH, timeout=15) for _ in range(count))
        )


async def test_concurrent_requests_spread_over_both_workers(system: EchoSystem) -> None:
    replies = await chat_many(system, 40)
    assert all(r.choices[0].finish_reason == "length" for r in replies)
    served = requests_served(system)
    assert sum(served) == 40
    # Least-loaded dispatch: neither worker is left idle, neither takes nearly all.
    assert min(served) >= 10, served


async def test_one_worker_stopped_requests_go_to_the_other(system: EchoSystem) -> None:
    system.chat_workers[0].stop()
    replies = await chat_many(system, 10)
    assert len(replies) == 10
    assert harness.worker_stats(system.chat_workers[1].address).requests_total == 10


async def test_killed_worker_is_failed_over(system: EchoSystem) -> None:
    # SIGKILL: no deregistration; the gateway finds out on its first calls, and
    # the other requests in flight to that worker move over too (a regression:
    # they once waited forever when the dead worker's channel was closed).
    system.chat_workers[0].signal(signal.SIGKILL)
    replies = await chat_many(system, 30)
    assert len(replies) == 30
    assert all(r.choices[0].finish_reason == "length" for r in replies)


def test_no_worker_is_503(system: EchoSystem) -> None:
    for proc in system.chat_workers:
        proc.stop()
    harness.wait_for_workers(system.url, CHAT_MODEL, 0, key=API_KEY)
    client = openai.OpenAI(base_url=f"{system.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 503
    assert caught.value.code == "service_unavailable"

    async def grpc_call() -> None:
        async with grpc.aio.insecure_channel(system.grpc_address) as channel:
            stub = api_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateChatCompletion(
                    api_pb2.CreateChatCompletionRequest(
                        model=CHAT_MODEL, messages=[common_pb2.ChatMessage(role="user", content="x")]
                    ),
                    metadata=AUTH,
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(grpc_call())
