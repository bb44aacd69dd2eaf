"""Per-key rate limits: requests and tokens per minute over a sliding 60-second window.

A :class:`RateLimiter` admits a request (or raises 429 with the seconds until one fits) and
records its tokens when it ends. :class:`MemoryRateLimiter` counts in this process: one front
end. :class:`RedisRateLimiter` counts in the shared store, so the limits hold across every
replica: the check and the count are one Lua script (atomic, on Redis's clock, so replicas whose
clocks differ still agree), sent with the request's routing lookup in one round trip
(:meth:`RateLimiter.admit_deferred`); the tokens at the end are written after the response, in
the background, merged with other requests' (common/store.py). A key without limits never
reaches the store.

When the store is down, ``--limits-when-store-down`` decides: ``local`` (the default) counts in
each replica's memory meanwhile, so a key gets at most its limits once per replica and never
goes unlimited, and the API stays up; ``closed`` refuses the requests of limited keys with 503
``store_unavailable``.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from common import errors
from common.store import PREFIX, Call, Store, StoreUnavailable, Write
from gateway.auth import ApiKey

WINDOW = 60.0
WHEN_STORE_DOWN = ("local", "closed")


def _rpm_exceeded(rpm: int, wait: float) -> errors.ApiError:
    return errors.rate_limited(f"Rate limit reached: {rpm} requests per minute for this key.", math.ceil(wait))


def _tpm_exceeded(tpm: int, wait: float) -> errors.ApiError:
    return errors.rate_limited(f"Rate limit reached: {tpm} tokens per minute for this key.", math.ceil(wait))


class RateLimiter(Protocol):
    async def admit(self, key: ApiKey) -> None:
        """Count a request of ``key``, or raise 429 (with Retry-After) when it is over a limit."""

    def admit_deferred(self, key: ApiKey) -> None:
        """:meth:`admit`, decided with the request's next round trip to the store (the 429 raised
        there), or now when no store is asked (gateway/inference.py sends it before dispatch)."""

    def record(self, key: ApiKey, tokens: int) -> None:
        """Count the tokens (prompt + completion) of a request of ``key`` that ended: never
        awaited (a write to the store goes in the background)."""


class _Windows:
    """One key's sliding windows, in this process."""

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_sum = 0

    def _prune(self, now: float) -> None:
        horizon = now - WINDOW
        while self.requests and self.requests[0] <= horizon:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= horizon:
            self.token_sum -= self.tokens.popleft()[1]

    def admit(self, rpm: int | None, tpm: int | None, now: float) -> None:
        self._prune(now)
        if rpm is not None and len(self.requests) >= rpm:
            raise _rpm_exceeded(rpm, self.requests[0] + WINDOW - now)
        if tpm is not None and self.token_sum >= tpm:
            excess, wait = self.token_sum - tpm, WINDOW
            for stamp, tokens in self.tokens:
                excess -= tokens
                if excess < 0:
                    wait = stamp + WINDOW - now
                    break
            raise _tpm_exceeded(tpm, wait)
        self.requests.append(now)

    def record(self, tokens: int, now: float) -> None:
        self.tokens.append((now, tokens))
        self.token_sum += tokens


class MemoryRateLimiter:
    """The windows of each key in this process (``--store memory``)."""

    def __init__(self) -> None:
        self._windows: dict[str, _Windows] = {}

    def _of(self, key: ApiKey) -> _Windows:
        windows = self._windows.get(key.id)
        if windows is None:
            windows = self._windows[key.id] = _Windows()
        return windows

    def admit_now(self, key: ApiKey, now: float | None = None) -> None:
        if key.limits.rpm is None and key.limits.tpm is None:
            return
        self._of(key).admit(key.limits.rpm, key.limits.tpm, time.monotonic() if now is None else now)

    def record_now(self, key: ApiKey, tokens: int, now: float | None = None) -> None:
        if key.limits.tpm is None or tokens <= 0:
            return
        self._of(key).record(tokens, time.monotonic() if now is None else now)

    async def admit(self, key: ApiKey) -> None:
        self.admit_now(key)

    def admit_deferred(self, key: ApiKey) -> None:
        self.admit_now(key)

    def record(self, key: ApiKey, tokens: int) -> None:
        self.record_now(key, tokens)


# KEYS: the key's requests (a sorted set of request ids by time), its tokens (a sorted set of
# "<id>:<tokens>" by time) and their sum. ARGV: rpm, tpm (-1: none), the window in
# microseconds, this request's id. Returns {0} (admitted), or {1 (rpm) | 2 (tpm), microseconds
# until a request fits}. Times are Redis's (TIME), in microseconds.
_PRUNE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[3])
local horizon = now - window
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon)
if #expired > 0 then
  local gone = 0
  for _, member in ipairs(expired) do
    gone = gone + tonumber(string.match(member, ':(%d+)$'))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)
  if redis.call('DECRBY', KEYS[3], gone) <= 0 then
    redis.call('DEL', KEYS[3])
  end
end
"""

_ADMIT = (
    _PRUNE
    + """
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm >= 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {1, oldest[2] and (tonumber(oldest[2]) + window - now) or window}
end
if tpm >= 0 then
  local excess = tonumber(redis.call('GET', KEYS[3]) or '0') - tpm
  if excess >= 0 then
    local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      excess = excess - tonumber(string.match(entries[i], ':(%d+)$'))
      if excess < 0 then
        return {2, tonumber(entries[i + 1]) + window - now}
      end
    end
    return {2, window}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return {0}
"""
)

# Several requests' tokens in one call: KEYS, two a key: its tokens, their sum (as above); ARGV:
# the window in microseconds, then the tokens and a unique id of each.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = math.ceil(tonumber(ARGV[1]) / 1000)
for k = 1, #KEYS / 2 do
  local tokens = ARGV[2 * k]
  redis.call('ZADD', KEYS[2 * k - 1], now, ARGV[2 * k + 1] .. ':' .. tokens)
  redis.call('INCRBY', KEYS[2 * k], tokens)
  redis.call('PEXPIRE', KEYS[2 * k - 1], ttl)
  redis.call('PEXPIRE', KEYS[2 * k], ttl)
end
return 1
"""


class RedisRateLimiter:
    """The windows of each key in the shared store, exact across replicas."""

    def __init__(self, store: Store, when_down: str = "local") -> None:
        self.store = store
        self.when_down = when_down
        self.local = MemoryRateLimiter()  # the fallback while the store is down ("local")
        self._admit = store.script(_ADMIT)
        self._record = store.script(_RECORD)
        # Unique request ids: this process's, then a counter.
        process = f"{os.getpid():x}.{os.urandom(4).hex()}."
        self._ids = (f"{process}{n}" for n in itertools.count())
        self._window_us = int(WINDOW * 1_000_000)
        self._tokens: dict[str, tuple[ApiKey, int]] = {}  # key id -> tokens not yet written
        store.add_writes(self._waiting)

    @staticmethod
    def _keys(key: ApiKey) -> list[str]:
        base = f"{PREFIX}limits:{key.id}:"
        return [base + "requests", base + "tokens", base + "token_sum"]

    def _admission(self, key: ApiKey) -> tuple[Call, Callable[[Any], None]] | None:
        """The script's call and what decides by its reply; None for a key without limits."""
        rpm, tpm = key.limits.rpm, key.limits.tpm
        if rpm is None and tpm is None:
            return None
        args = [-1 if rpm is None else rpm, -1 if tpm is None else tpm, self._window_us, next(self._ids)]

        def settle(verdict: Any) -> None:
            if isinstance(verdict, StoreUnavailable):
                if self.when_down == "closed":
                    raise errors.store_unavailable("Rate limits cannot be checked: the shared store is unavailable.")
                self.local.admit_now(key)
            elif verdict[0] == 1:
                raise _rpm_exceeded(rpm or 0, int(verdict[1]) / 1_000_000)
            elif verdict[0] == 2:
                raise _tpm_exceeded(tpm or 0, int(verdict[1]) / 1_000_000)

        return self._admit(keys=self._keys(key), args=args), settle

    async def admit(self, key: ApiKey) -> None:
        admission = self._admission(key)
        if admission is None:
            return
        call, settle = admission
        try:
            verdict = await self.store.run(call)
        except StoreUnavailable as error:
            verdict = error
        settle(verdict)

    def admit_deferred(self, key: ApiKey) -> None:
        admission = self._admission(key)
        if admission is not None:
            self.store.defer(*admission)

    def record(self, key: ApiKey, tokens: int) -> None:
        if key.limits.tpm is None or tokens <= 0:
            return
        _, waiting = self._tokens.get(key.id, (key, 0))
        self._tokens[key.id] = (key, waiting + tokens)  # a key's requests that end together: one entry
        self.store.wake()

    def _waiting(self) -> list[Write]:
        if not self._tokens:
            return []
        counts, self._tokens = self._tokens, {}
        keys: list[str] = []
        args: list[object] = [self._window_us]
        for key, tokens in counts.values():
            keys += self._keys(key)[1:]
            args += [tokens, next(self._ids)]

        def failed() -> None:
            if self.when_down == "local":
                for key, tokens in counts.values():
                    self.local.record_now(key, tokens)

        return [Write(self._record(keys=keys, args=args), failed)]
