"""API keys: ``authorization: Bearer <key>`` metadata, checked in one interceptor.

Keys are kept as SHA-256 digests and compared in constant time. With no keys
configured the API is open. Health, reflection and the registry are not
behind the keys (probes and workers must reach them).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable

import grpc

from gateway.errors import invalid_api_key
from gateway.grpc_server import abort_with

PROTECTED_PREFIX = "/tokenwire.v1.InferenceService/"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> bool:
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        candidate = _digest(token.strip())
        match = False
        for digest in self._digests:  # no early exit: constant time in the key list
            match |= hmac.compare_digest(candidate, digest)
        return match


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not self.keys.enabled or not handler_call_details.method.startswith(PROTECTED_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.keys.check(metadata.get("authorization")):  # type: ignore[arg-type]
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    error = invalid_api_key()

    async def deny_unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await abort_with(context, error)

    async def deny_stream(request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await abort_with(context, error)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream is not None:
        return handler._replace(unary_stream=deny_stream)  # type: ignore[attr-defined]
    return handler._replace(unary_unary=deny_unary)  # type: ignore[attr-defined]
