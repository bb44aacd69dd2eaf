"""What every route of the bridge does around its gateway call.

The JSON body in (bounded), the call's metadata (the caller's key, the request id) and
deadline, the call awaited (cancelled when the client hangs up) or streamed as SSE, and
JSON or OpenAI's error envelope out. ``create_app`` keeps the settings and the gateway's
stub in the app's state; routes reach them through :func:`settings` and :func:`gateway_stub`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from common import errors
from common.errors import ApiError
from common.observability import REQUEST_ID_HEADER, request_id
from rest_bridge import keepalive
from rest_bridge.config import BridgeSettings
from tokenwire.v1 import api_pb2_grpc

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"


def settings(request: Request) -> BridgeSettings:
    return request.app.state.settings


def gateway_stub(request: Request) -> api_pb2_grpc.InferenceServiceStub:
    return request.app.state.stub


# -- JSON in and out ------------------------------------------------------------------


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, at most ``--max-body-bytes`` of it."""
    max_bytes = settings(request).max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise errors.request_too_large(max_bytes)
    body = await request.body()
    if len(body) > max_bytes:
        raise errors.request_too_large(max_bytes)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise errors.invalid_request(f"We could not parse the JSON body of your request: {error}") from None
    if not isinstance(data, dict):
        raise errors.invalid_request("The request body must be a JSON object.")
    return data


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(error: ApiError) -> Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return json_response(error.envelope(), error.http_status, headers)


def stream_flag(body: dict[str, Any]) -> bool:
    """The body's ``stream``: false when absent or null."""
    stream = body.get("stream")
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise errors.invalid_request("'stream' must be a boolean.", "stream")
    return stream


# -- The gateway call -------------------------------------------------------------------


def call_metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """What the gateway needs from the HTTP request: the key and the request id."""
    authorization = request.headers.get("authorization")
    rid = (REQUEST_ID_HEADER, request_id.get())
    return (("authorization", authorization), rid) if authorization else (rid,)


def request_timeout(request: Request, stream: bool) -> float | None:
    """The request's deadline in seconds, passed on as the gRPC deadline.

    ``X-Request-Timeout`` sets it explicitly. The OpenAI SDK sends its read
    timeout as ``X-Stainless-Read-Timeout``: for a non-streamed request that is
    how long the client will wait for the answer, so it is the deadline too.
    """
    explicit = request.headers.get("x-request-timeout")
    value = explicit if explicit is not None else (None if stream else request.headers.get("x-stainless-read-timeout"))
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e7:
        if explicit is None:
            return None  # a malformed SDK header is not the caller's mistake to answer
        raise errors.invalid_request("X-Request-Timeout must be a positive number of seconds.", "X-Request-Timeout")
    return seconds


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def cancel_on_disconnect(request: Request, call: grpc.aio.UnaryUnaryCall) -> Any:
    """Await a gRPC call, cancelling it if the client hangs up first.

    The call runs in this task; only the watcher is a task of its own.
    """
    watcher = asyncio.ensure_future(_until_disconnect(request))
    watcher.add_done_callback(lambda done: done.cancelled() or call.cancel())
    try:
        return await call
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


# -- Streams ------------------------------------------------------------------------------


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _error_then_done(error: ApiError) -> bytes:
    return sse(error.envelope()) + SSE_DONE


@dataclass(frozen=True)
class SseEvents:
    """How one API writes its stream: each part as the bytes of its events ("" for none).

    The defaults are OpenAI's chunk stream: an error after the start goes out as
    ``data: {"error": ...}``, and ``data: [DONE]`` ends the stream either way.
    """

    chunk: Callable[[Any], bytes]  # one gRPC message
    opening: bytes = b""  # before the first message
    finish: Callable[[], bytes] = lambda: SSE_DONE  # after the last message
    fail: Callable[[ApiError], bytes] = _error_then_done  # an error once started; it ends the stream


async def open_stream(request: Request, call: grpc.aio.UnaryStreamCall, events: SseEvents) -> StreamingResponse:
    """Start an SSE response once the call's first message arrived.

    Errors before the first message become a normal HTTP error (raised from
    here); after it, they go out in-band (``events.fail``), and every stream
    ends cleanly. A stream still without its first message after the
    keep-alive interval starts anyway (rest_bridge/keepalive.py).
    """
    interval = settings(request).sse_keepalive_interval
    iterator = call.__aiter__()
    first = await keepalive.first_message(iterator, interval)

    async def body() -> AsyncIterator[bytes]:
        try:
            # Committed while it waits: a stream with no opening of its own says so at once.
            opening = events.opening or (b"" if first.done() else keepalive.KEEPALIVE)
            if opening:
                yield opening
            message = await first
            if message is not None:
                if data := events.chunk(message):
                    yield data
                async for message in iterator:
                    if data := events.chunk(message):
                        yield data
        except grpc.aio.AioRpcError as error:
            yield events.fail(ApiError.from_rpc_error(error))
            return
        finally:
            first.cancel()
            call.cancel()
        yield events.finish()

    return keepalive.KeepAliveResponse(body(), interval, SSE_HEADERS)
