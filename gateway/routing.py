"""Cache-aware routing: send a request to the worker most likely to hold its prompt in its prefix cache.

- **chain**: a request as the hashes of its successive prefixes. The canonical stream is the model
  name, tools, tool choice and response format (what the worker renders into the prompt besides the
  messages), then each message as role, name, content and tool calls, with separators and no length
  prefixes, so that two requests that share a beginning share bytes. It is cut at each message's end
  and every ``BLOCK`` bytes (long messages and completion prompts); a change to anything earlier
  changes every later hash.
- **index** (:class:`PrefixIndex`): prefix hash -> the workers that served it last (by address,
  stable across gateways and registry restarts) with the tokens that prefix is estimated to hold;
  LRU under a memory cap. A worker that leaves the pool leaves the index.
- **route**: the longest prefix held by a live worker within the load margin wins (the least loaded
  among its holders), down to a shared system prompt alone. With none (a new conversation): the
  least-loaded worker holding the fewest prefixes, so that new prefix families spread, ties broken
  by rendezvous hashing of the request's *anchor* (its first prefix); that prefix is recorded at
  once, so that its family's requests sent meanwhile follow it. ``prompt_cache_key``, when given,
  is the anchor and decides alone by its hash (within the margin), so that gateways that share no
  state agree; without it they agree through the shared index, or while their views agree. A
  tenant's sessions thus gather where its system prompt is cached, as long as the margin allows:
  within it a turn queues behind the holder rather than evaluate the prefix again elsewhere
  (measured against passing it on as soon as the holder is full: bench/RESULTS.md).
- **feedback**: after each choice its chain is recorded for the worker that served it; a worker
  that reports far fewer cached tokens than the index predicted has evicted them, and the index
  forgets those entries for it before recording what it now holds.
- **shared** (:class:`RedisIndex`, with ``--store redis://``): replicas share the index, so that a
  conversation whose turns reach different gateways stays on one worker. A request's holders come
  from the store before dispatch, in the request's one round trip (with its key's admission); what
  is recorded and forgotten goes to it in the background, never holding a response. Each gateway keeps its own :class:`MemoryIndex` too,
  and routes by it while the store is down.

Dispatch knows none of this: it gets a :class:`Route` as its preference (gateway/dispatch.py).
"""

from __future__ import annotations

import contextvars
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message

from common.store import PREFIX, Store, StoreUnavailable, Write
from gateway import metrics
from gateway.pool import WorkerHandle, least_loaded
from tokenwire.v1 import api_pb2, worker_pb2

# Cut every BLOCK bytes inside long messages too: long prompts that share a beginning (bench/RESULTS.md).
BLOCK = 1024
_DIGEST = 16
_FIELD, _RECORD = b"\x1f", b"\x1e"  # ASCII unit and record separators


# -- chains -------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    hashes: tuple[bytes, ...]  # of each prefix, shortest first
    ends: tuple[int, ...]  # where each prefix ends in the canonical stream (bytes)
    size: int  # bytes of the whole stream
    anchor: bytes  # what rendezvous hashing uses when no worker holds a prefix
    pinned: bool = False  # the anchor is the caller's prompt_cache_key: it decides, not the prefixes

    def tokens(self, prompt_tokens: int) -> list[int]:
        """Each prefix's estimated tokens: the prompt's, scaled by its share of the bytes."""
        return [prompt_tokens * end // max(self.size, 1) for end in self.ends]


class _ChainBuilder:
    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=_DIGEST)
        self._size = 0
        self.hashes: list[bytes] = []
        self.ends: list[int] = []

    def feed(self, data: bytes) -> None:
        """Add bytes, cutting at each BLOCK boundary of the stream."""
        while data:
            room = BLOCK - self._size % BLOCK
            part, data = data[:room], data[room:]
            self._hash.update(part)
            self._size += len(part)
            if self._size % BLOCK == 0:
                self.cut()

    def cut(self) -> None:
        if not self.ends or self.ends[-1] != self._size:
            self.hashes.append(self._hash.copy().digest())
            self.ends.append(self._size)

    def chain(self, cache_key: str) -> Chain:
        """The anchor is the caller's key, else the first prefix (the first message, or block)."""
        self.cut()
        anchor = b"key" + _FIELD + cache_key.encode() if cache_key else self.hashes[0]
        return Chain(tuple(self.hashes), tuple(self.ends), self._size, anchor, bool(cache_key))


def _header(model: str, *parts: bytes) -> _ChainBuilder:
    builder = _ChainBuilder()
    builder.feed(model.encode() + _FIELD + _FIELD.join(parts) + _RECORD)
    return builder


def _bytes(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


def chat_chain(request: api_pb2.CreateChatCompletionRequest) -> Chain:
    builder = _header(
        request.model,
        b"".join(_bytes(tool) for tool in request.tools),
        _bytes(request.tool_choice),
        _bytes(request.response_format),
    )
    for message in request.messages:
        if message.HasField("content_parts"):
            content = b"".join(_bytes(part) for part in message.content_parts.parts)
        else:
            content = message.content.encode()
        builder.feed(message.role.encode() + _FIELD + message.name.encode() + _FIELD + content)
        calls = b"".join(_bytes(call) for call in message.tool_calls)
        builder.feed(_FIELD + calls + _FIELD + message.tool_call_id.encode() + _RECORD)
        builder.cut()
    return builder.chain(request.prompt_cache_key)


def completion_chains(request: api_pb2.CreateCompletionRequest) -> list[Chain]:
    """One chain per prompt."""
    out = []
    for prompt in request.prompt:
        builder = _header(request.model, _bytes(request.response_format))
        if prompt.HasField("tokens"):
            builder.feed(b"".join(t.to_bytes(4, "little", signed=True) for t in prompt.tokens.ids))
        else:
            builder.feed(prompt.text.encode())
        out.append(builder.chain(request.prompt_cache_key))
    return out


# -- the index ------------------------------------------------------------------------


class PrefixIndex(Protocol):
    """Where chains and their workers are kept, in this gateway's memory (shared: :class:`RedisIndex`)."""

    def holders(self, hashes: Sequence[bytes]) -> list[dict[str, int]]:
        """For each hash: worker address -> estimated cached tokens ({} when none holds it)."""
        ...

    def record(self, hashes: Sequence[bytes], tokens: Sequence[int], worker: str) -> None: ...

    def forget(self, hashes: Sequence[bytes], worker: str) -> None: ...

    def forget_worker(self, worker: str) -> None: ...

    def held(self, worker: str) -> int:
        """How many prefixes the worker holds (what placing a new conversation balances)."""
        ...


# Bytes an entry costs, as tracemalloc measured it on CPython 3.12: 385 to 590 with its 16-byte key
# (the LRU's slot, the holders dict, the reverse set's slot), depending on where the hash tables are
# in their growth and on eviction's churn; a second holder adds about 32. Rounded up, so that the cap
# holds (tests/test_routing.py checks it with 100,000 distinct prefixes).
ENTRY_BYTES = 640
HOLDER_BYTES = 64


class MemoryIndex:
    """The index in this gateway's memory: an LRU of prefixes under a byte cap."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._entries: OrderedDict[bytes, dict[str, int]] = OrderedDict()
        self._by_worker: dict[str, set[bytes]] = {}
        self._holders = 0  # (entry, worker) pairs

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return len(self._entries) * ENTRY_BYTES + max(self._holders - len(self._entries), 0) * HOLDER_BYTES

    def holders(self, hashes: Sequence[bytes]) -> list[dict[str, int]]:
        get = self._entries.get
        return [get(h) or {} for h in hashes]

    def record(self, hashes: Sequence[bytes], tokens: Sequence[int], worker: str) -> None:
        mine = self._by_worker.setdefault(worker, set())
        for h, count in zip(hashes, tokens, strict=True):
            entry = self._entries.get(h)
            if entry is None:
                entry = self._entries[h] = {}
            else:
                self._entries.move_to_end(h)
            if worker not in entry:
                self._holders += 1
                mine.add(h)
            entry[worker] = count
        while self._entries and self.size_bytes > self.cap_bytes:
            self._drop(next(iter(self._entries)))

    def forget(self, hashes: Sequence[bytes], worker: str) -> None:
        mine = self._by_worker.get(worker, set())
        for h in hashes:
            entry = self._entries.get(h)
            if entry is not None and entry.pop(worker, None) is not None:
                self._holders -= 1
                mine.discard(h)
                if not entry:
                    del self._entries[h]

    def forget_worker(self, worker: str) -> None:
        self.forget(list(self._by_worker.pop(worker, ())), worker)

    def held(self, worker: str) -> int:
        return len(self._by_worker.get(worker, ()))

    def _drop(self, h: bytes) -> None:
        for worker in self._entries.pop(h):
            self._holders -= 1
            self._by_worker[worker].discard(h)


# Each prefix is one Redis hash, worker address -> tokens, its TTL renewed at each record: the TTL
# is the bound. The scripts get a request's prefixes as one string of hex digests and compute the
# keys: one argument, not one a prefix (less for redis-py to encode: about 10 % of a write's CPU).
_KEY = f"{PREFIX}routing:"
_HEX = 2 * _DIGEST
_KEY_LUA = (
    f"local function key(hashes, i) return '{_KEY}' .. string.sub(hashes, {_HEX} * i - {_HEX - 1}, {_HEX} * i) end"
)
_LOOKUP = f"""
{_KEY_LUA}
local hashes, out = ARGV[1], {{}}
for i = 1, #hashes / {_HEX} do
  out[i] = redis.call('HGETALL', key(hashes, i))
end
return out
"""
# ARGV[1]: the TTL in ms; then (worker, digests, tokens): the tokens comma-separated, or empty to
# forget the worker at those prefixes.
_UPDATE = f"""
{_KEY_LUA}
for r = 2, #ARGV, 3 do
  local worker, hashes, tokens = ARGV[r], ARGV[r + 1], ARGV[r + 2]
  if tokens == '' then
    for i = 1, #hashes / {_HEX} do
      redis.call('HDEL', key(hashes, i), worker)
    end
  else
    local i = 0
    for count in string.gmatch(tokens, '[^,]+') do
      i = i + 1
      redis.call('HSET', key(hashes, i), worker, count)
      redis.call('PEXPIRE', key(hashes, i), ARGV[1])
    end
  end
end
return 1
"""
# Prefixes waiting for the store, at most: beyond it updates are dropped (the index is advice; a
# store that does not keep up must not grow the gateway's memory, nor block Redis with one huge script).
MAX_PENDING = 2048
DEFAULT_TTL = 600.0  # seconds: about what the memory index's default cap holds at 150 new prefixes/s


class RedisIndex:
    """The index in the shared store, for every gateway that names it (``--store redis://``).

    Lookups are awaited before dispatch (one script, every prefix of the request, in the request's
    one round trip: common/store.py); records and forgets wait here, merged into one script call,
    until the store's background writer sends them, so that a response never waits on the store.
    A departed worker's entries are not deleted: routing filters holders to live workers, and the
    TTL ends them."""

    def __init__(self, store: Store, ttl: float = DEFAULT_TTL) -> None:
        self.store = store
        self.ttl_ms = int(ttl * 1000)
        self._lookup = store.script(_LOOKUP)
        self._update = store.script(_UPDATE)
        self._pending: list[str] = [str(self.ttl_ms)]  # the update's arguments
        self._pending_prefixes = 0
        store.add_writes(self._waiting)

    async def holders(self, chains: Sequence[Chain]) -> list[list[dict[str, int]]] | None:
        """Each chain's holders, or None while the store is down."""
        hashes = b"".join(h for chain in chains for h in chain.hashes).hex()
        try:
            replies = await self.store.run(self._lookup(args=[hashes]))
        except StoreUnavailable:
            return None
        held = [{reply[i].decode(): int(reply[i + 1]) for i in range(0, len(reply), 2)} for reply in replies]
        out, start = [], 0
        for chain in chains:
            out.append(held[start : start + len(chain.hashes)])
            start += len(chain.hashes)
        return out

    def record(self, hashes: Sequence[bytes], tokens: Sequence[int], worker: str) -> None:
        self._queue(worker, hashes, ",".join(map(str, tokens)))

    def forget(self, hashes: Sequence[bytes], worker: str) -> None:
        self._queue(worker, hashes, "")

    def _queue(self, worker: str, hashes: Sequence[bytes], tokens: str) -> None:
        if not hashes or self._pending_prefixes + len(hashes) > MAX_PENDING:
            return
        self._pending += (worker, b"".join(hashes).hex(), tokens)
        self._pending_prefixes += len(hashes)
        self.store.wake()

    def _waiting(self) -> list[Write]:
        if not self._pending_prefixes:
            return []
        args, self._pending, self._pending_prefixes = self._pending, [str(self.ttl_ms)], 0
        # Dropped if the store is down: each gateway's own index has them, and later turns record again.
        return [Write(self._update(args=args))]


# -- routing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Margin:
    """How much busier than the least-loaded worker a preferred worker may be: over the margin
    when it runs more than ``calls`` calls more *and* more than ``ratio`` times as many, or when
    the call would queue more than ``queue`` calls beyond its slots while the least-loaded worker
    has one free."""

    calls: int = 4
    ratio: float = 1.5
    queue: int = 4

    def over(self, worker: WorkerHandle, least: WorkerHandle) -> bool:
        mine, theirs = worker.calls(), least.calls()
        if mine + 1 - worker.status.capacity > self.queue and theirs < least.status.capacity:
            return True  # it would queue the call (past the allowance) while another worker has a free slot
        return mine - theirs > self.calls and mine > self.ratio * theirs


@dataclass
class Decision:
    """Where one choice went, and why: "prefix" (it holds the longest prefix held within the
    margin), "anchor" (none does: placed as a new conversation, or by the prompt_cache_key's hash),
    "load" (a worker holding the prefix, or the key's first choice, was over the margin)."""

    worker: str
    reason: str
    matched_tokens: int = 0


# The decisions of the API request being served (the gateway's log line reads them).
current_decisions: contextvars.ContextVar[list[Decision] | None] = contextvars.ContextVar(
    "current_decisions", default=None
)

# Cached tokens a worker must fall short of the prediction by, at least, before the index forgets:
# half the prediction, and at least this many (a block's worth of tokens or so).
FEEDBACK_MIN_TOKENS = 64


class Router:
    def __init__(
        self,
        index: PrefixIndex,
        margin: Margin | None = None,
        shared: RedisIndex | None = None,
        placement: str = "spread",
    ) -> None:
        self.index = index  # this gateway's own (with a shared one: its view while the store is down)
        self.margin = margin or Margin()
        self.shared = shared
        self.placement = placement  # of new conversations: "spread" by load and prefixes held, or "hash"

    def route(self, model: str, chains: Sequence[Chain], n: int) -> Route:
        """A route by this gateway's own index."""
        return Route(self, model, chains, n)

    async def fetch_route(self, model: str, chains: Sequence[Chain], n: int) -> Route:
        """A route by the shared index when there is one and it answers (one round trip), else :meth:`route`."""
        route = self.route(model, chains, n)
        if self.shared is not None:
            held = await self.shared.holders(chains)
            if held is not None:
                route._holders.update(enumerate(held))
        return route

    def record(self, hashes: Sequence[bytes], tokens: Sequence[int], worker: str) -> None:
        self.index.record(hashes, tokens, worker)
        if self.shared is not None:
            self.shared.record(hashes, tokens, worker)
        _export(self.index)

    def forget(self, hashes: Sequence[bytes], worker: str) -> None:
        self.index.forget(hashes, worker)
        if self.shared is not None:
            self.shared.forget(hashes, worker)

    def worker_left(self, address: str) -> None:
        self.index.forget_worker(address)  # the shared index's entries for it end with their TTL
        _export(self.index)


@dataclass
class Route:
    """One request's routing: choice ``i`` uses chain ``i // n`` (completions: one per prompt)."""

    router: Router
    model: str
    chains: Sequence[Chain]
    n: int
    _holders: dict[int, list[dict[str, int]]] = field(default_factory=dict)
    _predicted: dict[int, int] = field(default_factory=dict)
    _reasons: dict[int, str] = field(default_factory=dict)

    def reason(self, index: int) -> str:
        return self._reasons.get(index, "least_loaded")

    def predicted_tokens(self, index: int) -> int:
        return self._predicted.get(index, 0)

    def _chain_holders(self, prompt: int) -> list[dict[str, int]]:
        if prompt not in self._holders:  # once per prompt, also across failover
            self._holders[prompt] = self.router.index.holders(self.chains[prompt].hashes)
        return self._holders[prompt]

    def choose(self, candidates: Sequence[WorkerHandle], index: int) -> WorkerHandle:
        margin, least = self.router.margin, least_loaded(candidates)
        by_address = {w.status.address: w for w in candidates}
        decision: Decision | None = None
        chain, holders = self.chains[index // self.n], self._chain_holders(index // self.n)
        passed_over = False  # a worker that holds the prefix, or the anchor's, was over the margin
        for held in reversed([] if chain.pinned else holders):
            live = [by_address[a] for a in held if a in by_address]
            if live:
                best = least_loaded(live)
                if not margin.over(best, least):
                    decision = Decision(best.status.address, "prefix", held[best.status.address])
                    break
                passed_over = True
        if decision is None and (chain.pinned or self.router.placement == "hash"):
            # Rendezvous on the caller's key, or with "hash" placement on the first prefix: every
            # gateway ranks the workers alike, sharing no state.
            ranked = sorted(candidates, key=lambda w: -_rendezvous(chain.anchor, w.status.address))
            fits = next((w for w in ranked if not margin.over(w, least)), least)
            passed_over = passed_over or fits is not ranked[0]
            decision = Decision(fits.status.address, "load" if passed_over else "anchor")
        elif decision is None:
            # A new conversation (or its holders are over the margin): the least loaded, then the one
            # holding the fewest prefixes, so that new prefix families spread; then the anchor's hash,
            # so that gateways with the same view choose alike. Its anchor is recorded at once, so
            # that its family's next requests, even those sent before this one ends, follow it.
            index_ = self.router.index
            fits = min(
                candidates,
                key=lambda w: (w.load(), index_.held(w.status.address), -_rendezvous(chain.anchor, w.status.address)),
            )
            held_there = next(
                (held[fits.status.address] for held in reversed(holders) if fits.status.address in held), 0
            )
            decision = Decision(fits.status.address, "load" if passed_over else "anchor", held_there)
            if not held_there:
                self.router.record(chain.hashes[:1], [0], decision.worker)
        self._predicted[index] = decision.matched_tokens
        self._reasons[index] = decision.reason
        metrics.ROUTING_DECISIONS.labels(self.model, decision.reason, decision.worker).inc()
        decisions = current_decisions.get()
        if decisions is not None:
            decisions.append(decision)
        return by_address[decision.worker]

    def served(self, worker: WorkerHandle, response: worker_pb2.GenerateResponse) -> None:
        """A choice ended on ``worker``: check the prediction, and record what it now holds."""
        usage, router = response.end.usage, self.router
        chain = self.chains[response.index // self.n]
        tokens = chain.tokens(usage.prompt_tokens)
        address = worker.status.address
        if usage.HasField("prompt_tokens_details"):
            predicted, actual = self._predicted.get(response.index, 0), usage.prompt_tokens_details.cached_tokens
            metrics.ROUTING_PREDICTED.labels(self.model).inc(predicted)
            metrics.ROUTING_CACHED.labels(self.model).inc(actual)
            if predicted - actual >= max(FEEDBACK_MIN_TOKENS, predicted // 2):  # it evicted them
                stale = [h for h, t in zip(chain.hashes, tokens, strict=True) if t > actual]
                router.forget(stale, address)
                metrics.ROUTING_FORGOTTEN.labels(self.model).inc(len(stale))
        router.record(chain.hashes, tokens, address)


def _rendezvous(anchor: bytes, address: str) -> int:
    """The worker's weight for this anchor: the highest wins (rendezvous hashing)."""
    return int.from_bytes(hashlib.blake2b(anchor + _FIELD + address.encode(), digest_size=8).digest())


def _export(index: PrefixIndex) -> None:
    if isinstance(index, MemoryIndex):
        metrics.ROUTING_INDEX_ENTRIES.set(len(index))
        metrics.ROUTING_INDEX_BYTES.set(index.size_bytes)
