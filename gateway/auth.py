"""API keys and per-key rate limits, checked in one interceptor.

Keys arrive as ``authorization: Bearer <key>`` metadata (the REST bridge
passes its header through). They are kept as SHA-256 digests and compared in
constant time; with no keys configured the API is open. Each key may carry
limits: requests per minute and tokens (prompt + completion) per minute, counted
by a rate limiter (gateway/rate_limits.py); past them the request is refused with
429 and a Retry-After. A chat or completion's admission is decided with its routing lookup (one
round trip to a shared store), so there its 400s and 404s come first. Health, reflection and the registry are not behind the
keys (probes and workers must reach them).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from common import errors
from common.authorization import bearer_key, parse_authorization
from gateway import metrics

if TYPE_CHECKING:
    from gateway.rate_limits import RateLimiter

PROTECTED_PREFIXES = ("/tokenwire.v1.InferenceService/", "/tokenwire.v1.BatchService/")
# Calls whose admission is decided in the round trip to the store that fetches their route, not
# one of its own (gateway/inference.py sends it before dispatch, also without a routing lookup).
ADMITTED_WITH_ROUTE = frozenset(
    f"/tokenwire.v1.InferenceService/{name}"
    for name in ("CreateChatCompletion", "StreamChatCompletion", "CreateCompletion", "StreamCompletion")
)


@dataclass(frozen=True)
class KeyLimits:
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class KeySpec:
    key: str
    limits: KeyLimits


def parse_key_line(line: str, default: KeyLimits) -> KeySpec:
    """``<key> [rpm=N] [tpm=N]``: one line of a keys file."""
    key, *options = line.split()
    values = {"rpm": default.rpm, "tpm": default.tpm}
    for option in options:
        name, _, value = option.partition("=")
        if name not in values or not value.isdigit():
            raise ValueError(f"bad key option {option!r}: use rpm=N or tpm=N")
        values[name] = int(value)
    return KeySpec(key, KeyLimits(**values))


@dataclass(frozen=True)
class ApiKey:
    """A configured key, as the rest of the gateway knows it: never the key itself."""

    label: str  # for logs
    id: str  # the hex SHA-256 of the key: its name in the shared store
    limits: KeyLimits


# The key of the request being served (its limits), set by the interceptor.
current_key: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("current_key", default=None)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The keys the API accepts: loaded at start, loaded again when the keys file changes
    (gateway/key_reload.py), less the revoked ones (a key another replica's file dropped)."""

    def __init__(self, specs: Iterable[KeySpec], default: KeyLimits | None = None) -> None:
        default = default or KeyLimits()
        self._keys: list[tuple[bytes, ApiKey]] = []
        # With no keys, everyone shares the default limits (if any).
        self._anonymous = ApiKey("anonymous", "anonymous", default)
        # Once it had keys, the API stays closed: a keys file that loses its last key is no way to open it.
        self._required = False
        self.revoked: frozenset[str] = frozenset()
        self.load(specs)

    @property
    def enabled(self) -> bool:
        return self._required or bool(self._keys)

    def load(self, specs: Iterable[KeySpec]) -> tuple[set[str], set[str]]:
        """Accept ``specs`` from now on; the ids of the keys (removed, added)."""
        before = {key.id for _, key in self._keys}
        specs = [s for s in specs if s.key]
        self._keys = [
            (digest, ApiKey(f"key#{i + 1}", digest.hex(), s.limits))
            for i, (digest, s) in enumerate((_digest(s.key), s) for s in specs)
        ]
        after = {key.id for _, key in self._keys}
        self._required = self._required or bool(after)
        return before - after, after - before

    def by_id(self, key_id: str) -> ApiKey | None:
        """The key whose objects (batches, files) these are; None once it is no longer accepted."""
        if not self.enabled:
            return self._anonymous
        found = next((key for _, key in self._keys if key.id == key_id), None)
        return None if found is None or found.id in self.revoked else found

    def lookup(self, authorization: str | None) -> ApiKey | None:
        """The key, the anonymous one when the API is open, or None."""
        if not self.enabled:
            return self._anonymous
        key = bearer_key(authorization)
        if key is None:
            return None
        candidate = _digest(key)
        found = None
        for digest, state in self._keys:  # no early exit: constant time in the key list
            if hmac.compare_digest(candidate, digest):
                found = state
        if found is not None and found.id in self.revoked:
            return None
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys, limiter: RateLimiter) -> None:
        self.keys = keys
        self.limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROTECTED_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        authorization = metadata.get("authorization")
        state = self.keys.lookup(authorization)
        if state is None:
            given = bool(parse_authorization(authorization)[1])
            return _deny(handler, errors.invalid_api_key() if given else errors.missing_api_key())
        try:
            if handler_call_details.method in ADMITTED_WITH_ROUTE:
                self.limiter.admit_deferred(state)
            else:
                await self.limiter.admit(state)
        except errors.ApiError as error:
            return _deny(handler, error)
        current_key.set(state)
        return handler


def _deny(handler: grpc.RpcMethodHandler, error: errors.ApiError) -> grpc.RpcMethodHandler:
    """A handler that raises ``error``: the call wrapper around it (common/grpc_server.py) answers it."""
    metrics.ERRORS.labels("-", error.code or error.type).inc()

    async def deny_unary(request: object, context: grpc.aio.ServicerContext) -> None:
        raise error

    async def deny_stream(request: object, context: grpc.aio.ServicerContext):
        raise error
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream is not None:
        return handler._replace(unary_stream=deny_stream)
    return handler._replace(unary_unary=deny_unary)
