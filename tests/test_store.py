"""The shared store's plumbing and the rate limiters over a real redis-server (tests/redis_server.py).

The replicas' behaviour through real front ends is in tests/test_replicas.py; here, what needs
precise control: many admissions at once, Retry-After, a store killed, hung and restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from prometheus_client import CollectorRegistry

from common import errors
from common.store import Store, StoreConfig, StoreUnavailable, redacted, send_deferred
from gateway.auth import ApiKey, ApiKeys, KeyLimits, KeySpec
from gateway.key_reload import KeyReloader, KeysSource, RedisRevocations
from gateway.rate_limits import MemoryRateLimiter, RedisRateLimiter
from gateway.routing import RedisIndex, chat_chain
from tests import harness
from tests.redis_server import RedisServer
from tests.test_routing import chat


def _store(server: RedisServer, timeout_ms: int = 2000) -> Store:
    return Store(StoreConfig(server.url, None, timeout_ms), "test", CollectorRegistry())


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[Store]:
    shared = _store(redis_server)
    await shared.start()
    yield shared
    await shared.close()


def _key(name: str, rpm: int | None = None, tpm: int | None = None) -> ApiKey:
    return ApiKey(name, name, KeyLimits(rpm, tpm))


async def _admitted(limiter: RedisRateLimiter | MemoryRateLimiter, key: ApiKey, attempts: int) -> list[int]:
    """The Retry-After of each refusal, and 0 for each admission, from ``attempts`` at once."""

    async def one() -> int:
        try:
            await limiter.admit(key)
        except errors.ApiError as error:
            assert error.status == grpc.StatusCode.RESOURCE_EXHAUSTED and error.code == "rate_limit_exceeded"
            assert error.retry_after is not None
            return error.retry_after
        return 0

    return list(await asyncio.gather(*(one() for _ in range(attempts))))


async def test_rpm_is_exact_under_concurrent_admissions_from_two_clients(
    store: Store, redis_server: RedisServer
) -> None:
    # Two limiters on two connections: two replicas.
    other = _store(redis_server)
    try:
        key = _key("k1", rpm=10)
        a, b = RedisRateLimiter(store), RedisRateLimiter(other)
        results = await asyncio.gather(_admitted(a, key, 15), _admitted(b, key, 15))
        outcomes = [*results[0], *results[1]]
        assert outcomes.count(0) == 10
        assert all(1 <= wait <= 60 for wait in outcomes if wait)
    finally:
        await other.close()


async def test_tpm_counts_recorded_tokens_and_says_when_they_leave_the_window(store: Store) -> None:
    limiter = RedisRateLimiter(store)
    key = _key("k2", tpm=100)
    await limiter.admit(key)
    limiter.record(key, 60)  # not awaited: the next admission carries it if not yet sent
    await limiter.admit(key)  # 60 < 100
    limiter.record(key, 60)
    with pytest.raises(errors.ApiError) as refused:
        await limiter.admit(key)
    assert refused.value.retry_after is not None and 55 <= refused.value.retry_after <= 60
    # A key without limits never reaches the store.
    before = await store.client.dbsize()
    for _ in range(3):
        await limiter.admit(_key("free"))
    assert await store.client.dbsize() == before


async def test_a_limited_keys_request_is_one_round_trip_and_its_tokens_go_after(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admission rides with the routing lookup; the count at the end, and the index's record,
    go in the background, merged, and in before this process's next admission."""
    trips: list[list[str]] = []
    send = store._send

    def counted(commands: list[tuple[object, ...]], replied: Callable[[object], None]) -> None:
        trips.append([str(command[0]) for command in commands])
        send(commands, replied)

    limiter, index = RedisRateLimiter(store), RedisIndex(store)
    key, chain = _key("k6", rpm=2, tpm=100), chat_chain(chat("hello", "hi"))
    await index.holders([chain])  # made after the store started: Redis learns them on first use, by their source
    await limiter.admit(_key("warm", rpm=1))
    monkeypatch.setattr(store, "_send", counted)
    limiter.admit_deferred(key)
    assert await index.holders([chain]) == [[{}] * len(chain.hashes)]
    assert trips == [["EVALSHA", "EVALSHA"]]  # admission and lookup: one round trip
    await send_deferred()
    assert len(trips) == 1  # nothing left to send
    limiter.record(key, 60)
    limiter.record(key, 50)  # two requests of one key ending together: one entry
    index.record(chain.hashes, [10] * len(chain.hashes), "127.0.0.1:5000")
    await store.writes_sent()
    assert trips[1] == ["EVALSHA", "EVALSHA"]  # the tokens and the index's record: one call each
    assert int(await store.client.get(limiter._keys(key)[2])) == 110
    # Over the tpm now: the next request is refused in its lookup's round trip.
    limiter.admit_deferred(key)
    with pytest.raises(errors.ApiError) as refused:
        await index.holders([chain])
    assert refused.value.code == "rate_limit_exceeded" and "tokens per minute" in refused.value.message
    # Without a lookup, send_deferred sends the admission alone; a Redis that lost its scripts
    # (a restart) gets them by their source once.
    await store.client.script_flush()
    other = _key("k7", rpm=1)
    limiter.admit_deferred(other)
    await send_deferred()
    limiter.admit_deferred(other)
    with pytest.raises(errors.ApiError):
        await send_deferred()
    assert trips[-3:] == [["EVALSHA"], ["EVAL"], ["EVALSHA"]]


async def test_limits_window_slides_on_the_stores_clock(store: Store) -> None:
    # The script ages entries by Redis's TIME: an entry made 61 s ago has left the window.
    limiter = RedisRateLimiter(store)
    key = _key("k3", rpm=1)
    await limiter.admit(key)
    with pytest.raises(errors.ApiError):
        await limiter.admit(key)
    requests_key = limiter._keys(key)[0]
    [(member, score)] = await store.client.zrange(requests_key, 0, -1, withscores=True)
    await store.client.zadd(requests_key, {member: score - 61_000_000})
    await limiter.admit(key)


async def test_store_down_local_counts_per_replica_and_closed_refuses(redis_server: RedisServer) -> None:
    shared = _store(redis_server, timeout_ms=300)
    await shared.start()
    try:
        local, closed = RedisRateLimiter(shared, "local"), RedisRateLimiter(shared, "closed")
        key = _key("k4", rpm=2)
        redis_server.kill()
        # local: this replica's own windows, so the limit still holds here.
        await _admitted(local, key, 1)
        assert not shared.up
        assert sorted(await _admitted(local, key, 2))[0] == 0
        assert sorted(await _admitted(local, key, 2)) != [0, 0]
        with pytest.raises(errors.ApiError) as refused:
            await closed.admit(key)
        assert refused.value.code == "store_unavailable" and refused.value.http_status == 503
        # A key without limits does not care.
        await closed.admit(_key("free"))
        redis_server.start()
        await asyncio.to_thread(harness.wait_until, lambda: shared.up, what="the store up again")
        await closed.admit(key)  # the store counts again (its AOF kept nothing of this key)
    finally:
        await shared.close()


async def test_a_hung_store_costs_one_deadline_then_fails_fast(redis_server: RedisServer) -> None:
    shared = _store(redis_server, timeout_ms=200)
    echo = shared.script("return ARGV[1]")
    await shared.start()
    try:
        assert await shared.run(echo(args=["before"])) == b"before"
        redis_server.pause()
        started = time.monotonic()
        # Calls pipelined on the one connection together: each fails at the deadline, none hangs.
        outcomes = await asyncio.gather(*(shared.run(echo(args=[str(n)])) for n in range(10)), return_exceptions=True)
        first = time.monotonic() - started
        assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
        # The deadline, not the kernel's TCP timeout (the time is the behaviour under test).
        assert 0.15 <= first < 2.0
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(StoreUnavailable):
                await shared.run(echo(args=["down"]))
            with pytest.raises(StoreUnavailable):
                await shared.ping()
        assert time.monotonic() - started < 0.1  # down: nobody waits on it
        redis_server.resume()
        await asyncio.to_thread(harness.wait_until, lambda: shared.up, what="the store up again")
        assert await shared.run(echo(args=["after"])) == b"after"  # a new connection
        assert await shared.ping()
    finally:
        redis_server.resume()
        await shared.close()


async def test_a_connection_the_store_closes_is_opened_again(store: Store) -> None:
    """Redis closing the connection between round trips (a restart, CLIENT KILL, its idle timeout)
    fails nothing: the next round trip opens another."""
    echo = store.script("return ARGV[1]")
    assert await store.run(echo(args=["before"])) == b"before"
    killed = await store.client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert killed == 1  # the store's own connection (this one, redis-py's pool's, is skipped)
    for _ in range(10_000):  # turns of the event loop, until it has read the close
        if store._link._wire is None:
            break
        await asyncio.sleep(0)
    assert store._link._wire is None
    assert await store.run(echo(args=["after"])) == b"after"
    assert store.up


async def test_revocation_reaches_another_replica_through_the_store(store: Store, redis_server: RedisServer) -> None:
    other = _store(redis_server)
    try:
        files = {"a": [KeySpec("k-alpha", KeyLimits()), KeySpec("k-beta", KeyLimits())]}
        keys_a = ApiKeys(files["a"])
        keys_b = ApiKeys([KeySpec("k-alpha", KeyLimits()), KeySpec("k-beta", KeyLimits())])
        a = KeyReloader(keys_a, KeysSource(lambda: files["a"], None), RedisRevocations(store))
        b = KeyReloader(keys_b, KeysSource(lambda: [], None), RedisRevocations(other))
        files["a"] = [KeySpec("k-alpha", KeyLimits())]  # beta dropped from a's file
        a.reload_now.set()
        await a.step()
        assert keys_a.lookup("Bearer k-beta") is None
        await b.step()
        assert keys_b.lookup("Bearer k-beta") is None  # b's own keys still have it
        assert keys_b.lookup("Bearer k-alpha") is not None
        files["a"] = [KeySpec("k-alpha", KeyLimits()), KeySpec("k-beta", KeyLimits())]  # back
        a.reload_now.set()
        await a.step()
        await b.step()
        assert keys_b.lookup("Bearer k-beta") is not None
    finally:
        await other.close()


def test_memory_limiter_keeps_todays_sliding_windows() -> None:
    limiter = MemoryRateLimiter()
    key = _key("m", rpm=2, tpm=10)
    limiter.admit_now(key, now=0.0)
    limiter.admit_now(key, now=1.0)
    with pytest.raises(errors.ApiError) as refused:
        limiter.admit_now(key, now=2.0)
    assert refused.value.retry_after == 58
    limiter.admit_now(key, now=60.5)
    limiter.record_now(key, 12, now=60.5)
    with pytest.raises(errors.ApiError):
        limiter.admit_now(key, now=61.5)


def test_the_password_never_reaches_a_log() -> None:
    assert redacted("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redacted("rediss://:secret@host/1") == "rediss://:***@host/1"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"
