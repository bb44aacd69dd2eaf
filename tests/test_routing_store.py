"""Cache-aware routing shared by two front ends through a real Redis (``--store redis://``).

A standalone registry, three echo workers, and two ``tokenwire front-end`` processes over them;
a client alternates between the front ends. Rendezvous hashing alone already keeps a plain
conversation on one worker, so the test makes the two views differ: front end A holds three long
streams on the conversation's anchor worker, so that A sends its first turn elsewhere, past the
load margin; front end B has no calls there and would send the next turn back to the anchor,
unless it reads where A sent the turns before. Then Redis is killed (each front end routes by its
own view, with no error) and started again (shared again).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from tests import harness
from tests.conftest import CHAT_MODEL
from tests.redis_server import RedisServer

KEY = "routing-key"
TURNS = 10
HELD = 3  # streams held on the anchor's worker: past the default margin (2 calls and 1.5 times)


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


def diverted_conversation(fleet: Fleet, midway: Callable[[], None] = lambda: None) -> tuple[int, list[int]]:
    """The anchor's worker, and the workers that served a conversation of TURNS turns alternating
    A, B, A, ..., begun while A holds HELD streams on its anchor's worker (``midway`` runs after
    half of them)."""
    harness.wait_until(lambda: not any(fleet.in_flight()), what="no call left from before")
    system = {"role": "system", "content": f"You are assistant {uuid.uuid4()}. " * 8}
    a, b = fleet.client(0), fleet.client(1)
    held = [
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
        messages: list[dict[str, Any]] = [system, {"role": "user", "content": "hello"}]
        for turn, client in zip(range(TURNS), itertools.cycle([a, b]), strict=False):
            if turn == TURNS // 2:
                midway()
            reply = client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
            messages += [{"role": "assistant", "content": reply.choices[0].message.content}]
            messages += [{"role": "user", "content": f"and then, {turn}?"}]
        after = fleet.served()
    finally:
        for stream in held:
            stream.close()
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
    """The control: the same conversation, the front ends sharing nothing, splits over two workers."""
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
    # A conversation begun while the store is down: each front end routes by its own view (its turns
    # split, as without a store), with no error and no wait.
    anchor, landed = diverted_conversation(fleet)
    assert len(landed) == 2 and anchor in landed, (anchor, landed)
    for front, mark in zip(fleet.front_ends, marks, strict=True):
        assert "down (gateway)" in front.log(since=mark)

    redis.start()
    for front in fleet.front_ends:
        harness.wait_until(lambda f=front: "up again (gateway)" in f.log(), what="the store up again")
    anchor, landed = diverted_conversation(fleet)
    assert len(landed) == 1 and landed != [anchor], (anchor, landed)
