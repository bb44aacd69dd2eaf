"""What one use of the shared store costs the front end's process: CPU and time an operation, in-process.

The classes the gateway and the bridge use (``gateway/rate_limits.py``,
``rest_bridge/responses/store.py``) called directly on uvloop, as the front end runs them, against
a redis-server of its own (``make redis``) and against their memory twins: a bare ``PING``, a
limited key's admission (one script), its admission and the count of its tokens (two), a stored
response's put and get (two), cache-aware routing's lookup, decision and record of a chat request
(``gateway/routing.py``: one script awaited, one written in the background, batched). Each operation ``--calls`` times one after another (concurrency 1:
what a request waits) and in batches of 32 at once (what a busy front end pays a call), in
``--rounds`` rounds with the operations in turn. The figure is this process's own CPU
(``time.process_time``) a call, which other processes on a shared machine disturb far less than
a rate; Redis's CPU is not in it.

    .venv/bin/python -m bench.experiments.store_client_cost --calls 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import servers
from bench.servers import Group
from common.store import Store, StoreConfig, send_deferred
from gateway.auth import ApiKey, KeyLimits
from gateway.rate_limits import MemoryRateLimiter, RedisRateLimiter
from gateway.routing import MemoryIndex, RedisIndex, Router, chat_chain
from rest_bridge.responses.store import MemoryResponseStore, RedisResponseStore, Stored

HIGH = 10**12  # limits no load reaches: every call is admitted
BATCH = 32
STORES: list[Store] = []

Operation = Callable[[int], Awaitable[object]]


def operations(store: Store, python_parser: Store) -> dict[str, tuple[Operation, Operation]]:
    """name -> (its memory twin, the store's); each takes the call's number."""
    rpm = ApiKey("rpm", "a" * 64, KeyLimits(HIGH, None))
    both = ApiKey("rpm+tpm", "b" * 64, KeyLimits(HIGH, HIGH))
    memory_limits, redis_limits = MemoryRateLimiter(), RedisRateLimiter(store)
    memory_responses = MemoryResponseStore(10**6, 10**9, 3600)
    redis_responses = RedisResponseStore(store, 10**6, 10**9, 3600)
    owner = bytes(32)
    ids = itertools.count()

    async def nothing(_: int) -> None:
        return None

    async def ping(_: int) -> object:
        return await store.ping()

    def admit_and_record(limits: MemoryRateLimiter | RedisRateLimiter) -> Operation:
        async def operation(_: int) -> None:
            await limits.admit(both)
            limits.record(both, 40)

        return operation

    def put_and_get(responses: MemoryResponseStore | RedisResponseStore) -> Operation:
        async def operation(_: int) -> None:
            response_id = f"resp_bench{next(ids)}"
            history = [{"role": "user", "content": "Hello from the benchmark, how are you today?"}]
            stored = Stored({"id": response_id, "object": "response", "output": []}, history, [])
            assert await responses.put(owner, stored)
            assert await responses.get(response_id, owner) is not None

        return operation

    admission = redis_limits._admission(rpm)
    assert admission is not None
    call = admission[0]
    redis_py_script = store.client.register_script(call.script.source)

    async def pipeline_of_one(_: int) -> object:
        pipeline = store.client.pipeline(transaction=False)
        pipeline.execute_command(*call.command())
        return await pipeline.execute()

    async def python_ping(_: int) -> object:
        return await python_parser.ping()

    return {
        "ping": (nothing, ping),
        "ping, Python parser": (nothing, python_ping),
        "limited chat, 1 round trip": (
            limited_chat(Router(MemoryIndex(2**28)), memory_limits, both, together=True),
            limited_chat(Router(MemoryIndex(2**28), shared=RedisIndex(store)), redis_limits, both, together=True),
        ),
        "limited chat, 3 round trips": (
            limited_chat(Router(MemoryIndex(2**28)), memory_limits, both, together=False),
            limited_chat(Router(MemoryIndex(2**28), shared=RedisIndex(store)), redis_limits, both, together=False),
        ),
        "admit, pipeline of one": (nothing, pipeline_of_one),
        "admit, redis-py Script": (nothing, lambda _: redis_py_script(keys=call.keys, args=call.args)),
        "route (chat, 9 turns)": (
            route_chat(Router(MemoryIndex(2**28))),
            route_chat(Router(MemoryIndex(2**28), shared=RedisIndex(store))),
        ),
        "admit (rpm)": (lambda _: memory_limits.admit(rpm), lambda _: redis_limits.admit(rpm)),
        "admit + record (rpm+tpm)": (admit_and_record(memory_limits), admit_and_record(redis_limits)),
        "response put + get": (put_and_get(memory_responses), put_and_get(redis_responses)),
    }


def limited_chat(
    router: Router, limits: MemoryRateLimiter | RedisRateLimiter, key: ApiKey, together: bool
) -> Operation:
    """A limited key's chat as the gateway runs it (``together``): its admission deferred to its
    routing lookup's round trip, its tokens and the index's record written after it, in the
    background; else each of the three awaited in a round trip of its own."""
    route = route_chat(router)
    shared = router.shared.store if router.shared is not None else None

    async def operation(call: int) -> None:
        if together:
            limits.admit_deferred(key)
        else:
            await limits.admit(key)
        await route(call)
        await send_deferred()
        limits.record(key, 640)
        if not together and shared is not None:
            await shared.writes_sent()

    return operation


def route_chat(router: Router) -> Operation:
    """A conversation's next turn: its chain, the holders (from the store: one script), the choice,
    and the record of what the worker now holds (to the store: in the background)."""
    from tests.test_routing import Worker, chat, ended

    pool: list[Any] = [Worker(f"127.0.0.1:{5000 + i}") for i in range(3)]
    turns = [f"turn {t}: " + "words " * 40 for t in range(9)]  # a 1 KiB system prompt, 9 messages
    requests = [chat(*turns, system=f"Tenant {c}'s assistant. " + "rules " * 160) for c in range(64)]

    async def operation(call: int) -> None:
        request = requests[call % len(requests)]
        route = await router.fetch_route(request.model, [chat_chain(request)], 1)
        route.served(route.choose(pool, 0), ended(0, 600, None))

    return operation


async def timed(operation: Operation, calls: int, batch: int) -> tuple[float, float]:
    """(µs of this process's CPU, µs of wall time) a call."""
    calls -= calls % batch
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for start in range(0, calls, batch):
        if batch == 1:
            await operation(start)
        else:
            await asyncio.gather(*(operation(start + n) for n in range(batch)))
    for store in STORES:  # the background writes are the operations' too
        await store.writes_sent()
    return 1e6 * (time.process_time() - cpu0) / calls, 1e6 * (time.perf_counter() - wall0) / calls


async def main_async(address: str, calls: int, rounds: int) -> None:
    from prometheus_client import CollectorRegistry
    from redis._parsers import _AsyncRESP2Parser
    from redis.asyncio import Redis

    config = StoreConfig(f"redis://{address}/0", None, 1000)
    store = Store(config, "bench", CollectorRegistry())
    python_parser = Store(config, "bench", CollectorRegistry())
    # The same client with redis-py's pure-Python parser instead of hiredis, for its PING (an
    # experiment only: the store's own connection parses with hiredis since it reads for itself).
    python_parser.client = Redis.from_url(
        config.url, socket_timeout=1, socket_connect_timeout=1, parser_class=_AsyncRESP2Parser
    )
    STORES[:] = [store, python_parser]
    ops = operations(store, python_parser)
    for shared in STORES:
        await shared.start()
    figures: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for memory, redis in ops.values():  # warm up: scripts loaded, connections open
        for operation in (memory, redis):
            await timed(operation, BATCH * 4, BATCH)
    for round_ in range(rounds):
        for name, (memory, redis) in ops.items():
            for batch in (1, BATCH):
                for where, operation in (("memory", memory), ("redis", redis)):
                    figures.setdefault((name, where, batch), []).append(await timed(operation, calls, batch))
        print(f"round {round_ + 1}/{rounds} done", flush=True)
    for shared in STORES:
        await shared.close()
    print(f"\nthis process's CPU a call (µs), median of {rounds} rounds of {calls} calls (range); wall time a call")
    for name in ops:
        for batch in (1, BATCH):
            line = f"  {name:30s} {batch:2d} at once:"
            cpus = {}
            for where in ("memory", "redis"):
                cpu = [c for c, _ in figures[(name, where, batch)]]
                wall = statistics.median(w for _, w in figures[(name, where, batch)])
                cpus[where] = statistics.median(cpu)
                line += f"  {where} {cpus[where]:6.1f} ({min(cpu):.1f}-{max(cpu):.1f}), {wall:6.1f} wall"
            print(line + f"  +{cpus['redis'] - cpus['memory']:.0f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000, help="calls of each operation a round (3000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    args = parser.parse_args()
    import uvloop

    with Group() as group:
        redis = group.start(servers.redis_server("redis"))
        uvloop.run(main_async(redis.address, args.calls, args.rounds))


if __name__ == "__main__":
    main()
