"""Load on echo workers: 500 concurrent streams all complete; 400 streams
cancelled at random points leave nothing running and nothing leaked."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator

import grpc
import httpx
import pytest

from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, EchoSystem, start_echo_system, stop_system
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

TOKENS = 20


def peak_rss_mb(proc: harness.Proc) -> float:
    assert proc.process is not None
    with open(f"/proc/{proc.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def load_system() -> Iterator[EchoSystem]:
    system = start_echo_system(
        delay=0.01, tokens=TOKENS, context=1000, worker_args=("--limit-worker-concurrency", "300", "--max-queue", "300")
    )
    yield system
    stop_system(system)


def stats(system: EchoSystem) -> list:
    return [harness.worker_stats(w.address) for w in system.chat_workers]


async def test_500_concurrent_streams(load_system: EchoSystem) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "load test"}], "stream": True}
    limits = httpx.Limits(max_connections=600, max_keepalive_connections=600)

    async def one(client: httpx.AsyncClient) -> int:
        content = 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if not line or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    # Echo tokens are words; a chunk may carry several.
                    content += len(chunk["choices"][0]["delta"].get("content", "").split())
        return content

    async with httpx.AsyncClient(
        base_url=load_system.url, headers={"Authorization": f"Bearer {API_KEY}"}, limits=limits, timeout=120
    ) as client:
        counts = await asyncio.gather(*(one(client) for _ in range(500)))
    assert counts == [TOKENS] * 500
    assert all(s.in_flight == 0 for s in stats(load_system))
    bridge_mb, gateway_mb = peak_rss_mb(load_system.bridge), peak_rss_mb(load_system.gateway)
    print(f"\npeak RSS under 500 streams: bridge {bridge_mb:.0f} MB, gateway {gateway_mb:.0f} MB")
    assert bridge_mb + gateway_mb < 400


@pytest.fixture(scope="module")
def long_system() -> Iterator[EchoSystem]:
    # 3000 tokens x 20 ms = 60 s: every stream is still generating when its
    # client leaves, however slow a loaded machine makes the client.
    system = start_echo_system(
        delay=0.02,
        tokens=3000,
        context=100_000,
        worker_args=("--limit-worker-concurrency", "300", "--max-queue", "300"),
    )
    yield system
    stop_system(system)


async def test_400_random_cancels_leave_nothing_running(long_system: EchoSystem) -> None:
    load_system = long_system
    before = sum(s.cancelled_total for s in stats(load_system))
    rng = random.Random(7)
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "cancel me"}], "stream": True}

    async def rest(client: httpx.AsyncClient, stop_after: int) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            seen = 0
            async for line in reply.aiter_lines():
                if line:
                    seen += 1
                    if seen >= stop_after:
                        break  # leaving the block drops the connection

    async def over_grpc(stub: api_pb2_grpc.InferenceServiceStub, stop_after: int) -> None:
        request = api_pb2.CreateChatCompletionRequest(
            model=CHAT_MODEL, messages=[common_pb2.ChatMessage(role="user", content="cancel me")]
        )
        call = stub.StreamChatCompletion(
            api_pb2.StreamChatCompletionRequest(request=request), metadata=(("authorization", f"Bearer {API_KEY}"),)
        )
        seen = 0
        async for _ in call:
            seen += 1
            if seen >= stop_after:
                call.cancel()
                break

    limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(
            base_url=load_system.url, headers={"Authorization": f"Bearer {API_KEY}"}, limits=limits, timeout=60
        ) as client,
        grpc.aio.insecure_channel(load_system.grpc_address) as channel,
    ):
        stub = api_pb2_grpc.InferenceServiceStub(channel)
        jobs = [rest(client, rng.randint(1, 40)) for _ in range(200)]
        jobs += [over_grpc(stub, rng.randint(1, 40)) for _ in range(200)]
        rng.shuffle(jobs)
        await asyncio.gather(*jobs)

    def settled() -> bool:
        current = stats(load_system)
        return all(s.in_flight == 0 and s.queue_length == 0 for s in current) and (
            sum(s.cancelled_total for s in current) - before >= 400
        )

    await asyncio.to_thread(harness.wait_until, settled, 30)
    current = stats(load_system)
    assert sum(s.cancelled_total for s in current) - before == 400
    assert max(s.tokens_after_cancel_max for s in current) <= 1
