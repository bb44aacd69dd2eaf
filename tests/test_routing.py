"""Cache-aware routing's domain code (gateway/routing.py), without processes: chains, the index
under its memory cap, and the decisions. tests/test_routing_cluster.py drives it through real ones."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import Callable
from typing import Any

from gateway import routing
from gateway.pool import WorkerHandle, WorkerPool
from gateway.registry import Registry
from gateway.routing import Margin, MemoryIndex, Router, chat_chain, completion_chains
from tokenwire.v1 import api_pb2, common_pb2, registry_pb2, worker_pb2

SYSTEM = "You are a helpful assistant. " * 40


def chat(
    *turns: str, model: str = "m", key: str = "", system: str = SYSTEM, **extra: Any
) -> api_pb2.CreateChatCompletionRequest:
    messages = [common_pb2.ChatMessage(role="system", content=system)]
    for i, text in enumerate(turns):
        messages.append(common_pb2.ChatMessage(role="user" if i % 2 == 0 else "assistant", content=text))
    return api_pb2.CreateChatCompletionRequest(model=model, messages=messages, prompt_cache_key=key, **extra)


class Worker:
    """What routing reads of a WorkerHandle, without its channel."""

    def __init__(self, address: str, in_flight: int = 0) -> None:
        self.status = registry_pb2.WorkerStatus(worker_id=address, address=address, capacity=4)
        self.in_flight = in_flight
        self._own_at_report = 0

    def heartbeat(self, in_flight: int, queue_length: int) -> None:
        """A report from the worker arrives, as WorkerPool passes it on."""
        status = registry_pb2.WorkerStatus()
        status.CopyFrom(self.status)
        status.in_flight, status.queue_length = in_flight, queue_length
        status.last_heartbeat_unix_ms += 500
        self.report(status)

    def passed_on(self) -> None:
        """Another worker's heartbeat: the registry passes this one's last report on again."""
        status = registry_pb2.WorkerStatus()
        status.CopyFrom(self.status)
        self.report(status)

    report, calls, load = WorkerHandle.report, WorkerHandle.calls, WorkerHandle.load


def workers(count: int) -> list[Any]:
    return [Worker(f"127.0.0.1:{5000 + i}") for i in range(count)]


def ended(index: int, prompt_tokens: int, cached: int | None) -> worker_pb2.GenerateResponse:
    response = worker_pb2.GenerateResponse(index=index)
    response.end.usage.prompt_tokens = prompt_tokens
    if cached is not None:
        response.end.usage.prompt_tokens_details.cached_tokens = cached
    return response


def serve(router: Router, request: api_pb2.CreateChatCompletionRequest, pool: list[Any], cached: int = 0) -> Any:
    """Route one request and report it served; the chosen worker."""
    route = router.route(request.model, [chat_chain(request)], 1)
    chosen = route.choose(pool, 0)
    route.served(chosen, ended(0, 1000, cached))
    return chosen


# -- chains ---------------------------------------------------------------------------


def test_a_later_turn_extends_the_earlier_chain() -> None:
    first, second = chat_chain(chat("hello")), chat_chain(chat("hello", "hi there", "and then?"))
    assert second.hashes[: len(first.hashes)] == first.hashes
    assert len(second.hashes) > len(first.hashes)
    assert first.anchor == second.anchor == first.hashes[0]  # the system prompt (its first KiB)


def test_what_the_prompt_depends_on_changes_every_hash() -> None:
    base = chat_chain(chat("hello"))
    tool = common_pb2.Tool(type="function", function=common_pb2.FunctionDefinition(name="get"))
    for other in (
        chat("hello", tools=[tool]),
        chat("hello", response_format=common_pb2.ResponseFormat(type="json_object")),
        chat("hello", model="other"),
    ):
        assert not set(chat_chain(other).hashes) & set(base.hashes)
    # A different first user message: the system prompt and the anchor are shared.
    sibling = chat_chain(chat("goodbye"))
    assert sibling.hashes[0] == base.hashes[0] and sibling.anchor == base.anchor
    assert sibling.hashes[-1] != base.hashes[-1]


def test_long_messages_are_cut_in_blocks_and_share_their_beginning() -> None:
    document = "lorem ipsum " * 1000
    a = chat_chain(chat(document + "first question"))
    b = chat_chain(chat(document + "second question"))
    shared = [x for x, y in zip(a.hashes, b.hashes, strict=False) if x == y]
    assert len(shared) >= len(document) // routing.BLOCK  # block cuts inside the one user message
    assert a.hashes[-1] != b.hashes[-1]


def test_completion_prompts_have_a_chain_each_and_the_key_anchors() -> None:
    request = api_pb2.CreateCompletionRequest(
        model="m",
        prompt=[common_pb2.TextOrTokens(text="x" * 3000), common_pb2.TextOrTokens(tokens=common_pb2.TokenIds(ids=[1]))],
        prompt_cache_key="tenant-a",
    )
    text, tokens = completion_chains(request)
    assert len(text.hashes) == 3 and len(tokens.hashes) == 1
    assert text.anchor == tokens.anchor == chat_chain(chat("x", key="tenant-a")).anchor


# -- the index ------------------------------------------------------------------------


def test_the_index_stays_under_its_cap_with_100000_distinct_prefixes() -> None:
    cap = 8 * 2**20
    pool = [f"127.0.0.1:{5000 + i}" for i in range(3)]
    tracemalloc.start()
    try:
        index = MemoryIndex(cap)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, 100_000, 10):
            hashes = [os.urandom(16) for _ in range(10)]
            index.record(hashes, list(range(1000, 1010)), pool[i % 3])
            index.record(hashes[:5], list(range(1000, 1005)), pool[(i + 1) % 3])  # a second holder
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0 < len(index) < 100_000  # the cap evicted, LRU first
    assert index.size_bytes <= cap
    assert used <= cap, (used, cap, len(index))
    assert used >= cap * 0.5  # and the estimate is not so generous that the cap means little


def test_lru_eviction_keeps_the_recent_prefixes() -> None:
    index = MemoryIndex(routing.ENTRY_BYTES * 10)
    old, new = [os.urandom(16) for _ in range(5)], [os.urandom(16) for _ in range(10)]
    index.record(old, [1] * 5, "w")
    index.record(new, [1] * 10, "w")
    assert index.holders(old) == [{}] * 5
    assert index.holders(new) == [{"w": 1}] * 10


# -- decisions ------------------------------------------------------------------------


def test_a_conversations_turns_stay_on_one_worker() -> None:
    router, pool = Router(MemoryIndex(2**20)), workers(3)
    turns = ["hi", "hello!", "how are you?", "fine.", "and now?", "now this."]
    chosen = {serve(router, chat(*turns[: k + 1]), pool).status.address for k in range(0, len(turns), 2)}
    assert len(chosen) == 1
    decisions: list[routing.Decision] = []
    routing.current_decisions.set(decisions)
    route = router.route("m", [chat_chain(chat(*turns, "one more"))], 1)
    assert route.choose(pool, 0).status.address in chosen
    assert decisions[0].reason == "prefix" and decisions[0].matched_tokens > 0


def test_a_busy_worker_loses_its_affinity_past_the_margin() -> None:
    router, pool = Router(MemoryIndex(2**20), Margin(calls=2, ratio=1.5)), workers(3)
    for worker in pool:
        worker.status.capacity = 8
    home = serve(router, chat("hi"), pool)
    home.in_flight = 2  # 2 more than the idle ones: within the margin
    assert serve(router, chat("hi", "yo", "again"), pool) is home
    home.in_flight = 3  # past it: the least loaded
    decisions: list[routing.Decision] = []
    routing.current_decisions.set(decisions)
    other = serve(router, chat("hi", "yo", "again", "ok", "more"), pool)
    assert other is not home and decisions[-1].reason == "load"
    # Busy everywhere alike: the margin is relative too.
    for worker in pool:
        worker.status.capacity, worker.in_flight = 16, 10
    home = serve(router, chat("hello", system="another tenant"), pool)
    home.in_flight = 13
    assert serve(router, chat("hello", "yo", "again", system="another tenant"), pool) is home


def test_a_full_worker_holding_the_prefix_may_queue_as_many_calls_as_the_margin_allows() -> None:
    router, pool = Router(MemoryIndex(2**20), Margin(calls=8, ratio=1.5, queue=2)), workers(3)
    home = serve(router, chat("hi"), pool)
    # All its slots taken and one call queued, all this gateway's (which the worker's report counts
    # too: once, not twice), the others idle: a second may queue.
    home.in_flight = home.status.capacity + 1
    home.heartbeat(home.status.capacity, 1)
    assert serve(router, chat("hi", "yo", "again"), pool) is home
    home.in_flight += 1  # a third would queue: past the margin
    assert serve(router, chat("hi", "yo", "again", "ok", "more"), pool) is not home
    # Calls of other gateways, which only the worker's report shows, count too.
    home.in_flight = 0
    home.heartbeat(home.status.capacity, 3)
    assert serve(router, chat("hi", "yo", "again", "ok", "more", "yes", "then"), pool) is not home


def test_a_report_sent_before_this_gateways_calls_ended_does_not_count_them_again() -> None:
    """A worker's report lags up to a heartbeat interval: right after this gateway's calls on the
    conversation's worker end, it still counts them, and read alone would pass the worker over."""
    router, pool = Router(MemoryIndex(2**20)), workers(3)
    home = serve(router, chat("hi"), pool)
    home.in_flight = 6
    home.heartbeat(home.status.capacity, 2)  # all six ours
    home.in_flight = 0  # they end; the next report has not come yet
    home.passed_on()
    assert home.calls() == 0
    assert serve(router, chat("hi", "yo", "again"), pool) is home
    # Another gateway's calls, which the report counts beyond ours, still count after ours end.
    home.in_flight = 1
    home.heartbeat(home.status.capacity, 3)
    home.in_flight = 0
    assert home.calls() == 6
    assert serve(router, chat("hi", "yo", "again", "ok", "more"), pool) is not home


async def test_a_gateways_own_registry_passes_each_report_on_as_it_came() -> None:
    """The gateway's pool follows its own registry in process, sharing its status objects: a
    heartbeat must not rewrite the report the pool holds, or the pool cannot tell that it is new
    (and counts the calls that were its own when it came as another gateway's)."""
    registry = Registry()
    pool = WorkerPool(registry.watch)
    pool.start()
    model = common_pb2.ModelInfo(name="m")
    try:
        registry.register(registry_pb2.WorkerStatus(worker_id="w", address="127.0.0.1:9", capacity=8, model=model))
        await until(pool, lambda: "w" in pool._workers)
        worker = pool._workers["w"]
        worker.in_flight = 3
        registry.heartbeat("w", 3, 0)  # all three ours
        await until(pool, lambda: worker.status.in_flight == 3)
        worker.in_flight = 0
        registry.register(registry_pb2.WorkerStatus(worker_id="v", address="127.0.0.1:10", capacity=8, model=model))
        await until(pool, lambda: "v" in pool._workers)  # w's report passed on again, with v's
        assert worker.calls() == 0
    finally:
        await pool.close()


async def until(pool: WorkerPool, predicate: Callable[[], bool]) -> None:
    """Until the pool's view satisfies ``predicate`` (it changes with each snapshot it applies)."""
    async with asyncio.timeout(5):
        while not predicate():
            await pool.changed.wait()


def test_new_conversations_spread_and_two_routers_with_the_same_view_agree() -> None:
    pool = workers(3)
    one, two = Router(MemoryIndex(2**20)), Router(MemoryIndex(2**20))
    homes: dict[str, int] = {}
    for tenant in range(30):
        system = f"tenant {tenant}'s assistant"
        first = serve(one, chat("hello", system=system), pool)
        # The other router has not seen this conversation, but has seen every earlier one (their next
        # turns): the same view, so the same choice (fewest prefixes held, then the anchor's hash).
        assert serve(two, chat("hello", "a reply", "the next turn", system=system), pool) is first
        homes[first.status.address] = homes.get(first.status.address, 0) + 1
    assert sorted(homes.values()) == [10, 10, 10]  # new prefix families spread evenly


def test_a_new_conversation_does_not_queue_where_another_worker_has_a_free_slot() -> None:
    router, pool = Router(MemoryIndex(2**20)), workers(3)
    for tenant in range(3):  # one tenant on each, then two more on the third worker
        serve(router, chat("hello", system=f"tenant {tenant}"), pool)
    free = pool[2]
    for tenant in range(3, 5):
        assert serve(router, chat("hello", system=f"tenant {tenant}"), [free]) is free
    for worker in pool:
        worker.in_flight = worker.status.capacity if worker is not free else worker.status.capacity - 1
    # The others hold fewer prefixes, but a call there would wait; here it runs at once.
    assert serve(router, chat("hello", system="tenant 5"), pool) is free
    free.in_flight += 1  # full everywhere: the fewest prefixes held again
    assert serve(router, chat("hello", system="tenant 6"), pool) is not free


def test_routers_that_share_nothing_agree_on_a_prompt_cache_key_only() -> None:
    pool = workers(3)
    seasoned, fresh = Router(MemoryIndex(2**20)), Router(MemoryIndex(2**20))
    for tenant in range(5):  # what only the first has seen: its view of who holds what differs
        serve(seasoned, chat("hello", system=f"tenant {tenant}"), pool)
    keyed = [serve(router, chat("q", key="tenant-9", system="new"), pool) for router in (seasoned, fresh)]
    assert keyed[0] is keyed[1]  # the key's hash alone decides
    # Unkeyed, a new conversation goes where each view has the fewest prefixes: they differ on some,
    # which the shared index (--store, tests/test_routing_store.py) settles.
    places = [[serve(router, chat("q", system=f"new {i}"), pool) for router in (seasoned, fresh)] for i in range(6)]
    assert any(a is not b for a, b in places)


def test_hash_placement_agrees_without_shared_state() -> None:
    pool = workers(3)
    seasoned, fresh = Router(MemoryIndex(2**20), placement="hash"), Router(MemoryIndex(2**20), placement="hash")
    for tenant in range(5):  # views that differ, as above
        serve(seasoned, chat("hello", system=f"tenant {tenant}"), pool)
    for i in range(12):
        first = serve(seasoned, chat("q", system=f"new {i}"), pool)
        # The other router has never seen this conversation: the first prefix's hash decides alike.
        assert serve(fresh, chat("q", "a reply", "the next turn", system=f"new {i}"), pool) is first


def test_a_new_familys_requests_sent_at_once_gather() -> None:
    router, pool = Router(MemoryIndex(2**20)), workers(3)
    # Both routed before either ends: the first's anchor is recorded when it is chosen.
    first, second = (router.route("m", [chat_chain(chat(q))], 1) for q in ("one", "two"))
    home = first.choose(pool, 0)
    home.in_flight += 1
    assert second.choose(pool, 0) is home and second.reason(0) == "prefix"


def test_a_tenants_sessions_gather_where_its_system_prompt_is_until_the_margin() -> None:
    router, pool = Router(MemoryIndex(2**20)), workers(3)
    home = serve(router, chat("first session"), pool)
    assert all(serve(router, chat(f"session {i}"), pool) is home for i in range(5))
    home.in_flight = home.status.capacity + 2  # full, 2 queued, the others idle: past 4 calls more
    spilled = serve(router, chat("one more session"), pool)
    assert spilled is not home
    # Now both hold the system prompt: the less loaded of them takes the next session.
    assert serve(router, chat("and another"), pool) is spilled


def test_prompt_cache_key_pins_different_conversations_together() -> None:
    router, pool = Router(MemoryIndex(2**20)), workers(3)
    serve(router, chat("warm up"), pool)  # the shared system prompt is held somewhere now
    # Different system prompts, which would spread without a key; and the shared one, held elsewhere
    # perhaps: the key decides.
    homes = {serve(router, chat("q", key="tenant-7", system=f"prompt {i}"), pool).status.address for i in range(10)}
    homes.add(serve(router, chat("q", key="tenant-7"), pool).status.address)
    assert len(homes) == 1


def test_an_evicted_prefix_is_forgotten() -> None:
    router, pool = Router(MemoryIndex(2**20)), workers(2)
    request = chat("hi", "hello", "more")
    home = serve(router, request, pool)
    chain = chat_chain(request)
    # The next turn matches it; the worker says it had evicted it all.
    route = router.route("m", [chat_chain(chat("hi", "hello", "more", "ok", "again"))], 1)
    assert route.choose(pool, 0) is home
    forgotten = []
    original = router.index.forget
    router.index.forget = lambda hashes, worker: (forgotten.extend(hashes), original(hashes, worker))  # type: ignore[method-assign]
    route.served(home, ended(0, 1200, 0))
    assert set(chain.hashes) <= set(forgotten)
    # It re-evaluated them, so it holds them again: recorded anew, the estimate refreshed.
    assert all(home.status.address in held for held in router.index.holders(chain.hashes))


def test_a_departed_worker_leaves_the_index() -> None:
    router, pool = Router(MemoryIndex(2**20)), workers(2)
    home = serve(router, chat("hi"), pool)
    router.worker_left(home.status.address)
    assert len(router.index) == 0  # type: ignore[arg-type]
    assert router.index.holders(chat_chain(chat("hi")).hashes) == [{}] * len(chat_chain(chat("hi")).hashes)
