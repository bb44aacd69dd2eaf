"""Closed-loop load: ``concurrency`` clients, each sending its next request when the
previous one is answered, for ``warmup`` + ``duration`` seconds.

Only the measurement window counts: requests completed inside it, and the CPU the
servers used between its start and its end (``/proc/<pid>/stat``), so per-request
CPU is window CPU / window requests. The client is one asyncio process (uvloop):
aiohttp for HTTP with pre-encoded bodies, grpc.aio with pre-built messages for gRPC.
It parses only what it must (the first SSE events until a content delta, for the
time to first token), so its own CPU per request stays small; it is measured too.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import orjson

from bench.servers import TICKS, Server

# A stream's chunk count, its time to first content token and to first event.
Sample = tuple[int, float | None, float | None]
Op = Callable[[], Awaitable[Sample]]


@dataclass
class Result:
    scenario: str
    concurrency: int
    duration: float
    requests: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    first_events: list[float] = field(default_factory=list)
    chunks: int = 0
    server_cpu: dict[str, float] = field(default_factory=dict)
    client_cpu: float = 0.0
    # CPU the whole machine was busy in the window, and what of it was neither the
    # servers nor the client (other processes: a noisy neighbour shows up here).
    machine_cpu: float = 0.0

    # -- derived figures --

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.duration if self.duration else 0.0

    def pct(self, values: Sequence[float], q: float) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def other_cpu(self) -> float:
        """What other processes used in the window."""
        return max(0.0, self.machine_cpu - self.client_cpu - sum(self.server_cpu.values()))

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "duration_s": round(self.duration, 3),
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
            "rps": self.rps,
            "p50_ms": _ms(self.pct(self.latencies, 0.50)),
            "p99_ms": _ms(self.pct(self.latencies, 0.99)),
            "chunks": self.chunks,
            "chunks_per_s": self.chunks_per_s,
            "ttft_p50_ms": _ms(self.pct(self.ttfts, 0.50)),
            "ttft_p99_ms": _ms(self.pct(self.ttfts, 0.99)),
            "first_event_p50_ms": _ms(self.pct(self.first_events, 0.5)),
            "server_cpu_s": self.server_cpu,
            "client_cpu_s": self.client_cpu,
            "machine_cpu_s": self.machine_cpu,
            "other_cpu_s": self.other_cpu,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else 1000 * value


def machine_busy() -> float:
    """Seconds of CPU the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # guest time is already counted in user.
    return (sum(values[:8]) - idle) / TICKS


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(
    scenario: str, op: Op, concurrency: int, warmup: float, duration: float, servers: Sequence[Server]
) -> Result:
    result = Result(scenario, concurrency, duration)
    window = {"start": float("inf"), "end": float("inf")}
    stop = False

    async def client() -> None:
        while not stop:
            t0 = time.perf_counter()
            try:
                chunks, ttft, first = await op()
            except Exception as error:
                t1 = time.perf_counter()
                if window["start"] <= t1 <= window["end"]:
                    result.errors += 1
                    if not result.first_error:
                        result.first_error = f"{type(error).__name__}: {error}"[:300]
                await asyncio.sleep(0.005)
                continue
            t1 = time.perf_counter()
            if window["start"] <= t1 <= window["end"]:
                result.requests += 1
                result.latencies.append(t1 - t0)
                result.chunks += chunks
                if ttft is not None:
                    result.ttfts.append(ttft)
                if first is not None:
                    result.first_events.append(first)

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        cpu0 = {s.name: s.cpu() for s in servers}
        client0 = _own_cpu()
        machine0 = machine_busy()
        window["start"] = time.perf_counter()
        window["end"] = window["start"] + duration
        await asyncio.sleep(duration)
        result.duration = time.perf_counter() - window["start"]
        cpu1 = {s.name: s.cpu() for s in servers}
        result.client_cpu = _own_cpu() - client0
        result.machine_cpu = machine_busy() - machine0
        result.server_cpu = {name: cpu1[name] - cpu0[name] for name in cpu0}
        window["end"] = min(window["end"], time.perf_counter())
    finally:
        stop = True
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


# -- HTTP ---------------------------------------------------------------------------------


class HttpClient:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=300),
            headers={"Content-Type": "application/json"},
        )

    async def close(self) -> None:
        await self.session.close()

    def post(self, path: str, body: dict[str, Any]) -> Op:
        url, data = self.base_url + path, orjson.dumps(body)

        async def op() -> Sample:
            async with self.session.post(url, data=data) as reply:
                payload = await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}: {payload[:200]!r}")
            return 1, None, None

        return op

    def stream(self, path: str, body: dict[str, Any]) -> Op:
        url, data = self.base_url + path, orjson.dumps(body)

        async def op() -> Sample:
            t0 = time.perf_counter()
            chunks, ttft, first = 0, None, None
            async with self.session.post(url, data=data) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}: {(await reply.read())[:200]!r}")
                async for line in reply.content:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        break
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
                    if b'"error"' in payload and "error" in orjson.loads(payload):
                        raise RuntimeError(f"in-band error: {payload[:200]!r}")
                    if ttft is None:
                        for choice in orjson.loads(payload).get("choices") or ():
                            if (choice.get("delta") or {}).get("content"):
                                ttft = time.perf_counter() - t0
            if ttft is None:
                raise RuntimeError(f"stream without content ({chunks} chunks)")
            return chunks, ttft, first

        return op


# -- gRPC -----------------------------------------------------------------------------------


def grpc_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        address,
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )


def grpc_unary(method: Callable[..., Any], request: Any) -> Op:
    async def op() -> Sample:
        await method(request)
        return 1, None, None

    return op


def grpc_stream(method: Callable[..., Any], request: Any, has_content: Callable[[Any], bool]) -> Op:
    async def op() -> Sample:
        t0 = time.perf_counter()
        chunks, ttft, first = 0, None, None
        async for message in method(request):
            chunks += 1
            if first is None:
                first = time.perf_counter() - t0
            if ttft is None and has_content(message):
                ttft = time.perf_counter() - t0
        if ttft is None:
            raise RuntimeError(f"stream without content ({chunks} messages)")
        return chunks, ttft, first

    return op
