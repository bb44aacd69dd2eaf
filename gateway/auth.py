"""API keys and per-key rate limits, checked in one interceptor.

Keys arrive as ``authorization: Bearer <key>`` metadata (the REST bridge
passes its header through). They are kept as SHA-256 digests and compared in
constant time; with no keys configured the API is open. Each key may carry
limits: requests per minute and tokens (prompt + completion) per minute, over
a sliding 60-second window; past them the request is refused with 429 and a
Retry-After. Health, reflection and the registry are not behind the keys
(probes and workers must reach them).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc

from common import errors
from common.authorization import bearer_key, parse_authorization
from common.grpc_server import abort_with
from gateway import metrics

PROTECTED_PREFIX = "/tokenwire.v1.InferenceService/"
WINDOW = 60.0


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


class KeyState:
    """One key's sliding windows."""

    def __init__(self, label: str, limits: KeyLimits) -> None:
        self.label = label  # for logs: never the key itself
        self.limits = limits
        self._requests: deque[float] = deque()
        self._tokens: deque[tuple[float, int]] = deque()
        self._token_sum = 0

    def _prune(self, now: float) -> None:
        horizon = now - WINDOW
        while self._requests and self._requests[0] <= horizon:
            self._requests.popleft()
        while self._tokens and self._tokens[0][0] <= horizon:
            self._token_sum -= self._tokens.popleft()[1]

    def admit(self, now: float | None = None) -> None:
        """Count a request, or raise 429 with the seconds until one fits."""
        now = time.monotonic() if now is None else now
        self._prune(now)
        rpm, tpm = self.limits.rpm, self.limits.tpm
        if rpm is not None and len(self._requests) >= rpm:
            wait = self._requests[0] + WINDOW - now
            raise errors.rate_limited(f"Rate limit reached: {rpm} requests per minute for this key.", math.ceil(wait))
        if tpm is not None and self._token_sum >= tpm:
            excess, wait = self._token_sum - tpm, WINDOW
            for stamp, tokens in self._tokens:
                excess -= tokens
                if excess < 0:
                    wait = stamp + WINDOW - now
                    break
            raise errors.rate_limited(f"Rate limit reached: {tpm} tokens per minute for this key.", math.ceil(wait))
        self._requests.append(now)

    def record(self, tokens: int, now: float | None = None) -> None:
        if self.limits.tpm is None or tokens <= 0:
            return
        now = time.monotonic() if now is None else now
        self._tokens.append((now, tokens))
        self._token_sum += tokens


# The key of the request being served (its limits), set by the interceptor.
current_key: contextvars.ContextVar[KeyState | None] = contextvars.ContextVar("current_key", default=None)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, specs: Iterable[KeySpec], default: KeyLimits | None = None) -> None:
        default = default or KeyLimits()
        self._keys = [(_digest(s.key), KeyState(f"key#{i + 1}", s.limits)) for i, s in enumerate(specs) if s.key]
        # With no keys, everyone shares the default limits (if any).
        self._anonymous = KeyState("anonymous", default)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def lookup(self, authorization: str | None) -> KeyState | None:
        """The key's state, the anonymous one when the API is open, or None."""
        if not self._keys:
            return self._anonymous
        key = bearer_key(authorization)
        if key is None:
            return None
        candidate = _digest(key)
        found = None
        for digest, state in self._keys:  # no early exit: constant time in the key list
            if hmac.compare_digest(candidate, digest):
                found = state
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROTECTED_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        authorization = metadata.get("authorization")
        state = self.keys.lookup(authorization)
        if state is None:
            given = bool(parse_authorization(authorization)[1])
            return _deny(handler, errors.invalid_api_key() if given else errors.missing_api_key())
        try:
            state.admit()
        except errors.ApiError as error:
            return _deny(handler, error)
        current_key.set(state)
        return handler


def _deny(handler: grpc.RpcMethodHandler, error: errors.ApiError) -> grpc.RpcMethodHandler:
    metrics.ERRORS.labels("-", error.code or error.type).inc()

    async def deny_unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await abort_with(context, error)

    async def deny_stream(request: object, context: grpc.aio.ServicerContext):
        await abort_with(context, error)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream is not None:
        return handler._replace(unary_stream=deny_stream)
    return handler._replace(unary_unary=deny_unary)
