"""Cache-aware routing shared by two front ends through a real Redis (``--store redis://``).

First the shared index alone (gateway/routing.py's RedisIndex under two Routers, as two gateways
hold them) over a real redis-server; then through real processes. A standalone registry, three
echo workers, and two ``tokenwire front-end`` processes over them; a client alternates between the
front ends. Front ends whose views agree (on a fresh fleet: nothing held, no calls, so the anchor's
hash decides) already keep a plain conversation on one worker, so the test makes the two views
differ: front end A holds five long streams on the worker where its view places the conversation
(its anchor worker), so that A sends its first turn elsewhere, past the load margin. Then the
streams end, and B, whose view has none of A's turns, would send the next turn to the anchor's
worker, unless it reads where A sent the first. Then Redis is killed (each front end routes by its
own view, with no error) and started again (shared again).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from common.store import Store, StoreConfig
from gateway.routing import MemoryIndex, RedisIndex, Router, chat_chain, completion_chains
from tests import harness
from tests.conftest import CHAT_MODEL
from tests.redis_server import RedisServer
from tests.test_routing import chat, ended, workers
from tokenwire.v1 import api_pb2

KEY = "routing-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TURNS = 10
HELD = 5  # streams held on the anchor's worker: past the default margin (4 calls and 1.5 times)


# -- the index alone -----------------------------------------------------------------------


@pytest.fixture
async def routers(redis_server: RedisServer) -> AsyncIterator[tuple[Router, Router]]:
    """Two gateways' routers over one store (each its own connection, as two processes have)."""
    stores = [Store(StoreConfig(redis_server.url, None, 2000), "gateway", CollectorRegistry()) for _ in range(2)]
    for store in stores:
        await store.start()
    yield (
        Router(MemoryIndex(2**20), shared=RedisIndex(stores[0])),
        Router(MemoryIndex(2**20), shared=RedisIndex(stores[1])),
    )
    for store in stores:
        await store.close()


async def written(router: Router) -> None:
    """Until the router's background writes are in the store."""
    assert router.shared is not None
    await router.shared.store.writes_sent()


async def test_what_one_gateway_records_another_routes_by(
    routers: tuple[Router, Router], redis_server: RedisServer
) -> None:
    one, two = routers
    pool = workers(3)
    request = chat("hello", "hi there", "more")
    route = await one.fetch_route("m", [chat_chain(request)], 1)
    home = pool[2]
    route.served(home, ended(0, 900, None))  # as if the margin had sent it to the third worker
    await written(one)
    later = await two.fetch_route("m", [chat_chain(chat("hello", "hi there", "more", "ok", "and?"))], 1)
    assert later.choose(pool, 0) is home and later.reason(0) == "prefix"
    assert two.index.holders(chat_chain(request).hashes)[0] == {}  # the other gateway's own index saw none of it
    # One hash a prefix, with a TTL.
    keys = [k for k in redis_server.keys() if k.startswith("tokenwire:routing:")]
    assert len(keys) == len(chat_chain(request).hashes)
    assert 0 < int(redis_server.command(None, "PTTL", keys[0])) <= 600_000
    # Completions: one chain a prompt, looked up together, each its own holders.
    prompts = api_pb2.CreateCompletionRequest(model="m")
    prompts.prompt.add(text="first prompt")
    prompts.prompt.add(text="second prompt")
    first, second = completion_chains(prompts)
    one.record(first.hashes, [5] * len(first.hashes), "127.0.0.1:5000")
    one.record(second.hashes, [7] * len(second.hashes), "127.0.0.1:5001")
    await written(one)
    assert await two.shared.holders([first, second]) == [  # type: ignore[union-attr]
        [{"127.0.0.1:5000": 5}] * len(first.hashes),
        [{"127.0.0.1:5001": 7}] * len(second.hashes),
    ]


async def test_what_one_gateway_forgets_all_forget(routers: tuple[Router, Router]) -> None:
    one, two = routers
    chain = chat_chain(chat("a long conversation", "with replies", "and questions"))
    one.record(chain.hashes, [10] * len(chain.hashes), "127.0.0.1:5000")
    one.record(chain.hashes, [20] * len(chain.hashes), "127.0.0.1:5001")
    await written(one)
    two.forget(chain.hashes[1:], "127.0.0.1:5000")  # it evicted all but the first prefix
    await written(two)
    held = await one.shared.holders([chain])  # type: ignore[union-attr]
    assert held == [[{"127.0.0.1:5000": 10, "127.0.0.1:5001": 20}] + [{"127.0.0.1:5001": 20}] * (len(chain.hashes) - 1)]


async def test_a_store_down_leaves_each_gateway_its_own_view(
    routers: tuple[Router, Router], redis_server: RedisServer
) -> None:
    one, two = routers
    pool = workers(3)
    redis_server.kill()
    request = chat("while down", "reply", "next")
    route = await one.fetch_route("m", [chat_chain(request)], 1)  # falls back at once
    home = route.choose(pool, 0)
    route.served(home, ended(0, 500, None))
    await written(one)
    assert one.index.holders(chat_chain(request).hashes)[0] == {home.status.address: chat_chain(request).tokens(500)[0]}
    again = await one.fetch_route("m", [chat_chain(chat("while down", "reply", "next", "r", "n"))], 1)
    assert again.choose(pool, 0) is home and again.reason(0) == "prefix"  # its own index
    await asyncio.wait_for(two.fetch_route("m", [chat_chain(request)], 1), 5)  # no hang at the other either


# -- through real processes -----------------------------------------------------------------


@dataclass
class Fleet:
    registry: harness.Proc
    workers: list[harness.Proc]
    front_ends: list[harness.Proc]

    def client(self, replica: int) -> openai.OpenAI:
        url = f"http://{self.front_ends[replica].part_address('bridge')}/v1"
        return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)

    def served(self) -> list[int]:
        return [harness.worker_stats(w.address).requests_total for w in self.workers]

    def in_flight(self) -> list[int]:
        return [harness.worker_stats(w.address).in_flight for w in self.workers]


def start_fleet(store: list[str]) -> Fleet:
    registry = harness.Proc(["registry", "--port", "0", "--heartbeat-expiry", "3"]).start()
    # Streams run long unless max_tokens stops them (20 ms a token), so that some can be held open.
    echo = ["--echo-tokens", "2000", "--echo-delay", "0.02", "--echo-context-length", "4096"]
    workers = [
        harness.echo_worker(registry.address, CHAT_MODEL, *echo, "--limit-worker-concurrency", "8") for _ in range(3)
    ]
    front_ends = [
        harness.front_end(["--controller-address", registry.address, "--api-keys", KEY, *store], store)
        for _ in range(2)
    ]
    fleet = Fleet(registry, workers, front_ends)
    for front in front_ends:
        harness.wait_for_workers(f"http://{front.part_address('bridge')}", CHAT_MODEL, 3, key=KEY)
    return fleet


def stop_fleet(fleet: Fleet) -> None:
    for proc in (*fleet.front_ends, *fleet.workers, fleet.registry):
        proc.stop()


@pytest.fixture
def shared(redis_server: RedisServer) -> Iterator[tuple[Fleet, RedisServer]]:
    # A deadline a loaded machine keeps: the outage under test is Redis killed, not a slow answer.
    fleet = start_fleet(["--store", redis_server.url, "--store-timeout-ms", "2000"])
    yield fleet, redis_server
    stop_fleet(fleet)


def settled(fleet: Fleet) -> None:
    """Until no call runs on any worker, and each front end's view (the workers' reports) says so."""

    def views() -> list[Any]:
        status = [
            httpx.get(f"http://{f.part_address('bridge')}/v1/status", headers=AUTH, timeout=5) for f in fleet.front_ends
        ]
        return [w["in_flight"] + w["queue_length"] for s in status for m in s.json()["models"] for w in m["workers"]]

    harness.wait_until(lambda: not any(fleet.in_flight()) and not any(views()), what="no call, in every view")


def diverted_conversation(fleet: Fleet, midway: Callable[[], None] = lambda: None) -> tuple[int, list[int]]:
    """The anchor's worker, and the workers that served a conversation of TURNS turns alternating
    A, B, A, ...: A sends the first while it holds HELD streams on its anchor's worker, and the
    rest follow once every view has seen those end (``midway`` runs after half the turns)."""
    settled(fleet)
    system: Any = {"role": "system", "content": f"You are assistant {uuid.uuid4()}. " * 8}
    a, b = fleet.client(0), fleet.client(1)
    messages: list[dict[str, Any]] = [system, {"role": "user", "content": "hello"}]

    def turn(client: openai.OpenAI, number: int) -> None:
        reply = client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        messages.extend(
            [
                {"role": "assistant", "content": reply.choices[0].message.content},
                {"role": "user", "content": f"and then, {number}?"},
            ]
        )

    held: list[Any] = [
        a.chat.completions.create(
            model=CHAT_MODEL, messages=[system, {"role": "user", "content": f"hold {i}"}], max_tokens=2000, stream=True
        )
        for i in range(HELD)
    ]
    try:
        for stream in held:
            next(iter(stream))
        harness.wait_until(lambda: HELD in fleet.in_flight(), what="the held streams on one worker")
        anchor = fleet.in_flight().index(HELD)
        before = fleet.served()
        turn(a, 0)
    finally:
        for stream in held:
            stream.close()
    # Every view now without them: B's own, read alone, places the conversation as A's did before them
    # (on a fresh fleet, on the anchor's worker); the store tells it where A sent the first turn.
    settled(fleet)
    for number, client in zip(range(1, TURNS), itertools.cycle([b, a]), strict=False):
        if number == TURNS // 2:
            midway()
        turn(client, number)
    after = fleet.served()
    return anchor, [i for i, (x, y) in enumerate(zip(before, after, strict=True)) if y > x]


def test_a_conversation_alternating_between_front_ends_stays_on_one_worker(
    shared: tuple[Fleet, RedisServer],
) -> None:
    fleet, redis = shared
    anchor, landed = diverted_conversation(fleet)
    assert len(landed) == 1 and landed != [anchor], (anchor, landed)  # where A sent the first turn
    prefixes = [name for name in redis.keys() if name.startswith("tokenwire:routing:")]
    assert prefixes
    ttl = int(redis.command(None, "TTL", prefixes[0]))
    assert 0 < ttl <= 600


def test_without_the_store_each_front_end_routes_by_its_own_view() -> None:
    """The control: the same conversation, the front ends sharing nothing, splits over two workers
    (B, fresh, places it where A placed its held streams: nothing held, no calls, the anchor's hash)."""
    fleet = start_fleet([])
    try:
        anchor, landed = diverted_conversation(fleet)
        assert len(landed) == 2 and anchor in landed, (anchor, landed)
    finally:
        stop_fleet(fleet)


def test_redis_killed_then_restarted_under_the_routing(shared: tuple[Fleet, RedisServer]) -> None:
    fleet, redis = shared
    marks = [front.log_mark() for front in fleet.front_ends]
    # Killed in the middle of a conversation: its later turns stay on its worker, with no error,
    # for each front end recorded the turns it sent there in its own index too.
    anchor, landed = diverted_conversation(fleet, midway=redis.kill)
    assert len(landed) == 1 and landed != [anchor], (anchor, landed)
    # A conversation begun while the store is down: each front end routes by its own view, with no
    # error and no wait: each keeps its own turns on one worker, and where their views (of what the
    # conversations before left where) place it differently, its turns split, as without a store.
    anchor, landed = diverted_conversation(fleet)
    assert 1 <= len(landed) <= 2 and landed != [anchor], (anchor, landed)
    for front, mark in zip(fleet.front_ends, marks, strict=True):
        assert "down (gateway)" in front.log(since=mark)

    redis.start()
    harness.wait_until(
        lambda: all("up again (gateway)" in front.log() for front in fleet.front_ends), what="the store up again"
    )
    anchor, landed = diverted_conversation(fleet)
    assert len(landed) == 1 and landed != [anchor], (anchor, landed)
