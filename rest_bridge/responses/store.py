"""Stored responses: put, get and delete by id, each visible to the key that made it only.

Bounded three ways: a count and a total of (JSON) bytes, past which the least recently used
go first, and a time to live: a response unused for ``ttl`` seconds is dropped. Two
implementations: :class:`MemoryResponseStore`, an LRU in this bridge process, lost on restart
(``--store memory``), and :class:`RedisResponseStore`, in the shared store, which every
replica's bridge reads and which outlives them (``--store redis://...``). When the shared
store is down, a lookup is 503 ``store_unavailable`` and a put says it kept nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from common import errors
from common.authorization import parse_authorization
from common.store import PREFIX, Store, StoreUnavailable


def owner_of(authorization: str | None) -> bytes:
    """Whose a stored response is: a digest of the caller's key."""
    return hashlib.sha256(parse_authorization(authorization)[1].encode()).digest()


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    # The whole conversation as chat messages, this response's output included.
    history: list[dict[str, Any]]
    # This request's own input, as Responses items with ids (for input_items).
    input_items: list[dict[str, Any]]

    def to_json(self) -> bytes:
        return orjson.dumps([self.response, self.history, self.input_items])

    @classmethod
    def from_json(cls, data: bytes) -> Stored:
        response, history, items = orjson.loads(data)
        return cls(response, history, items)


class ResponseStore(Protocol):
    async def put(self, owner: bytes, stored: Stored) -> bool:
        """Keep ``stored`` under its response's id; False when it was not kept (too large, the store down)."""

    async def get(self, response_id: str, owner: bytes) -> Stored | None:
        """The response, or None (unknown, evicted, expired, deleted or another key's)."""

    async def delete(self, response_id: str, owner: bytes) -> bool:
        """Whether there was such a response of ``owner``'s to delete."""


@dataclass
class _Entry:
    owner: bytes
    stored: Stored
    size: int
    used: float  # time.monotonic() of the last put or get


class MemoryResponseStore:
    """An LRU of responses in this process."""

    def __init__(self, max_count: int, max_bytes: int, ttl: float) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def put(self, owner: bytes, stored: Stored) -> bool:
        size = len(stored.to_json())
        if self.max_count <= 0 or size > self.max_bytes:
            return False  # larger than the whole store: not kept (a later lookup is a 404)
        now = time.monotonic()
        self._expire(now)
        response_id = stored.response["id"]
        self._drop(response_id)
        self._entries[response_id] = _Entry(owner, stored, size, now)
        self.bytes += size
        while len(self._entries) > self.max_count or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    async def get(self, response_id: str, owner: bytes) -> Stored | None:
        now = time.monotonic()
        self._expire(now)
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            return None  # another key's response is as absent as a missing one
        entry.used = now
        self._entries.move_to_end(response_id)
        return entry.stored

    async def delete(self, response_id: str, owner: bytes) -> bool:
        if await self.get(response_id, owner) is None:
            return False
        self._drop(response_id)
        return True

    def _expire(self, now: float) -> None:
        """Drop the entries unused for ``ttl``: the least recently used come first."""
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.used < self.ttl:
                return
            self._drop(oldest.stored.response["id"])

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size


# In Redis: each response is a string <owner's digest in hex>\n<its JSON> under ITEM + id, with a
# time to live; an index orders the ids by last use (a sorted set), a hash has their sizes and a
# counter their total. One script a put, one a get, one a delete: each is one round trip, and
# replicas never see half a put. Times are Redis's own (TIME), in milliseconds.
ITEM = PREFIX + "responses:item:"
INDEX = [PREFIX + "responses:lru", PREFIX + "responses:sizes", PREFIX + "responses:bytes"]

_NOW_AND_DROP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function drop(id)
  redis.call('DEL', ARGV[1] .. id)
  redis.call('ZREM', KEYS[1], id)
  local size = redis.call('HGET', KEYS[2], id)
  if size then
    redis.call('HDEL', KEYS[2], id)
    redis.call('DECRBY', KEYS[3], size)
  end
end
"""

# ARGV: the item prefix, the id, the value, its size, the ttl (ms), the count and bytes bounds.
_PUT = (
    _NOW_AND_DROP
    + """
local ttl = tonumber(ARGV[5])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl, 'LIMIT', 0, 100)) do
  drop(id)
end
drop(ARGV[2])
redis.call('SET', ARGV[1] .. ARGV[2], ARGV[3], 'PX', ttl)
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
local total = redis.call('INCRBY', KEYS[3], ARGV[4])
while redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[6]) or total > tonumber(ARGV[7]) do
  drop(redis.call('ZRANGE', KEYS[1], 0, 0)[1])
  total = tonumber(redis.call('GET', KEYS[3]) or '0')
end
return 1
"""
)

# ARGV: the item prefix, the id, the owner, the ttl (ms). The JSON, or nil.
_GET = (
    _NOW_AND_DROP
    + """
local value = redis.call('GET', ARGV[1] .. ARGV[2])
if not value or string.sub(value, 1, #ARGV[3] + 1) ~= ARGV[3] .. '\\n' then
  return false
end
redis.call('PEXPIRE', ARGV[1] .. ARGV[2], ARGV[4])
redis.call('ZADD', KEYS[1], 'XX', now, ARGV[2])
return string.sub(value, #ARGV[3] + 2)
"""
)

# ARGV: the item prefix, the id, the owner. 1 if deleted.
_DELETE = (
    _NOW_AND_DROP
    + """
local value = redis.call('GET', ARGV[1] .. ARGV[2])
if not value or string.sub(value, 1, #ARGV[3] + 1) ~= ARGV[3] .. '\\n' then
  return 0
end
drop(ARGV[2])
return 1
"""
)


class RedisResponseStore:
    """Responses in the shared store, for every replica, bounded across them."""

    def __init__(self, store: Store, max_count: int, max_bytes: int, ttl: float) -> None:
        self.store = store
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl_ms = max(1, int(ttl * 1000))
        self._put = store.script(_PUT)
        self._get = store.script(_GET)
        self._delete = store.script(_DELETE)

    async def put(self, owner: bytes, stored: Stored) -> bool:
        data = stored.to_json()
        if self.max_count <= 0 or len(data) > self.max_bytes:
            return False
        value = owner.hex().encode() + b"\n" + data
        args = [ITEM, stored.response["id"], value, len(data), self.ttl_ms, self.max_count, self.max_bytes]
        try:
            await self.store.run(self._put(keys=INDEX, args=args))
        except StoreUnavailable:
            return False
        return True

    async def get(self, response_id: str, owner: bytes) -> Stored | None:
        args = [ITEM, response_id, owner.hex(), self.ttl_ms]
        data = await self._run(self._get(keys=INDEX, args=args))
        return None if data is None else Stored.from_json(data)

    async def delete(self, response_id: str, owner: bytes) -> bool:
        return bool(await self._run(self._delete(keys=INDEX, args=[ITEM, response_id, owner.hex()])))

    async def _run(self, command: Any) -> Any:
        try:
            return await self.store.run(command)
        except StoreUnavailable:
            raise errors.store_unavailable(
                "Stored responses cannot be read: the shared store is unavailable."
            ) from None
