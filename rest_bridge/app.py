"""The REST bridge: OpenAI's REST + SSE API mapped onto the gateway's gRPC.

One channel to the gateway for the app's lifetime. ``Authorization`` goes
through as gRPC metadata: the gateway checks keys, so both fronts are
protected alike. Errors come back as gRPC statuses and leave here as OpenAI's
error envelope with the canonical HTTP status. A client that disconnects
cancels its gRPC call, which cancels the worker's generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import orjson
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from common import errors
from common.errors import ApiError
from common.grpc_server import open_channel
from common.observability import REQUEST_ID_HEADER, request_id
from common.sampling import Limits
from common.settings import DEFAULT_MAX_BODY_BYTES
from rest_bridge import convert, keepalive, openapi, page, render, status
from rest_bridge import metrics as bridge_metrics
from rest_bridge.middleware import RequestMiddleware
from tokenwire.v1 import api_pb2, api_pb2_grpc

log = logging.getLogger("tokenwire.bridge")
T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class BridgeSettings:
    gateway_address: str = "127.0.0.1:50051"
    # The gateway's --max-n / --max-tokens-limit, for /openapi.json (the gateway enforces them).
    limits: Limits = field(default_factory=Limits)
    allow_credentials: bool = False
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The Responses API's store of responses (see rest_bridge/responses.py).
    responses_store_size: int = 1000
    responses_store_bytes: int = 64 * 1024 * 1024
    # Seconds of silence after which an SSE stream sends ": keep-alive" (0: never).
    sse_keepalive_interval: float = 15.0


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(error: ApiError) -> Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return json_response(error.envelope(), error.http_status, headers)


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
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


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
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


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise errors.invalid_request("'stream' must be a boolean.", "stream")
    return stream


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


async def open_stream(
    call: grpc.aio.UnaryStreamCall, render_chunk: Callable[[Any], dict[str, Any]], keepalive_interval: float = 0.0
) -> StreamingResponse:
    """Start an SSE response once the first message arrived.

    Errors before the first message become a normal HTTP error (raised from
    here); after it, they go out in-band as ``data: {"error": ...}``, and
    every stream ends with ``data: [DONE]``. A stream still without its first
    message after the keep-alive interval starts anyway (rest_bridge/keepalive.py).
    """
    iterator = call.__aiter__()
    first = await keepalive.first_message(iterator, keepalive_interval)

    async def body() -> AsyncIterator[bytes]:
        try:
            if not first.done():
                yield keepalive.KEEPALIVE  # committed while it waits: say so at once
            message = await first
            if message is not None:
                yield sse(render_chunk(message))
                async for message in iterator:
                    yield sse(render_chunk(message))
        except grpc.aio.AioRpcError as error:
            yield sse(ApiError.from_rpc_error(error).envelope())
        finally:
            first.cancel()
            call.cancel()
        yield SSE_DONE

    return keepalive.KeepAliveResponse(body(), keepalive_interval, SSE_HEADERS)


@dataclass(frozen=True)
class GenerationApi:
    """How one generation endpoint maps onto the gateway's RPCs."""

    parse: Callable[[dict[str, Any]], Any]
    wants_logprobs: Callable[[Any], bool]
    unary_rpc: str
    stream_rpc: str
    stream_request: type
    render: Callable[[Any, bool], dict[str, Any]]
    render_chunk: Callable[[Any, bool, bool], dict[str, Any]]


CHAT = GenerationApi(
    parse=convert.chat_request,
    wants_logprobs=lambda m: bool(m.logprobs),
    unary_rpc="CreateChatCompletion",
    stream_rpc="StreamChatCompletion",
    stream_request=api_pb2.StreamChatCompletionRequest,
    render=render.chat_completion,
    render_chunk=render.chat_chunk,
)
COMPLETION = GenerationApi(
    parse=convert.completion_request,
    wants_logprobs=lambda m: m.HasField("logprobs"),
    unary_rpc="CreateCompletion",
    stream_rpc="StreamCompletion",
    stream_request=api_pb2.StreamCompletionRequest,
    render=render.completion,
    render_chunk=render.completion_chunk,
)


def create_app(settings: BridgeSettings | None = None) -> FastAPI:
    from rest_bridge import responses  # it imports this module's helpers

    settings = settings or BridgeSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_channel(settings.gateway_address) as channel:
            app.state.stub = api_pb2_grpc.InferenceServiceStub(channel)
            app.state.health = health_pb2_grpc.HealthStub(channel)
            yield

    app = FastAPI(title="tokenwire", version="0.1.0", lifespan=lifespan)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_credentials=settings.allow_credentials,
        allow_methods=settings.allowed_methods,
        allow_headers=settings.allowed_headers,
        expose_headers=["X-Request-Id"],
    )
    app.add_middleware(RequestMiddleware)

    def stub(request: Request) -> api_pb2_grpc.InferenceServiceStub:
        return request.app.state.stub

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        return error_response(error)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # gone while its body was read (or its read deadline passed)
    async def client_gone(request: Request, error: Exception) -> Response:
        # Nobody reads this; 499 is what proxies log for it.
        return Response(status_code=499)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def rpc_error(request: Request, error: grpc.aio.AioRpcError) -> Response:
        return error_response(ApiError.from_rpc_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        kind = "not_found" if error.status_code == 404 else None
        body = {"error": {"message": str(error.detail), "type": "invalid_request_error", "param": None, "code": kind}}
        return json_response(body, error.status_code, dict(error.headers or {}))

    @app.get("/health", tags=["operations"])
    async def health() -> Response:
        """Alive: the bridge answers."""
        return json_response({"status": "ok"})

    @app.get("/ready", tags=["operations"])
    async def ready(request: Request) -> Response:
        """Ready: the gateway serves, with a live worker for each of its models."""
        try:
            reply = await request.app.state.health.Check(
                health_pb2.HealthCheckRequest(service="tokenwire.v1.InferenceService"), timeout=2
            )
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            serving = False
        return json_response({"status": "ready" if serving else "not ready"}, 200 if serving else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> Response:
        return Response(generate_latest(bridge_metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["models"])
    async def list_models(request: Request) -> Response:
        reply = await stub(request).ListModels(api_pb2.ListModelsRequest(), metadata=_metadata(request))
        return json_response(render.models(reply))

    @app.get("/v1/models/{model:path}", tags=["models"])
    async def get_model(model: str, request: Request) -> Response:
        reply = await stub(request).GetModel(api_pb2.GetModelRequest(model=model), metadata=_metadata(request))
        return json_response(render.model(reply.model))

    async def generate(request: Request, api: GenerationApi) -> Response:
        body = await read_json(request, settings.max_body_bytes)
        message = api.parse(body)
        want_logprobs = api.wants_logprobs(message)
        streaming = _stream_flag(body)
        timeout = request_timeout(request, streaming)
        gateway = stub(request)
        if streaming:
            options = convert.stream_options(body)
            call = getattr(gateway, api.stream_rpc)(
                api.stream_request(request=message, stream_options=options),
                metadata=_metadata(request),
                timeout=timeout,
            )
            return await open_stream(
                call,
                lambda c: api.render_chunk(c, want_logprobs, options.include_usage),
                settings.sse_keepalive_interval,
            )
        rpc = getattr(gateway, api.unary_rpc)
        reply = await cancel_on_disconnect(request, rpc(message, metadata=_metadata(request), timeout=timeout))
        return json_response(api.render(reply, want_logprobs))

    async def chat(request: Request) -> Response:
        return await generate(request, CHAT)

    chat_doc: dict[str, Any] = {
        "openapi_extra": openapi.body(openapi.chat(settings.limits)),
        "responses": openapi.ERROR_RESPONSES,
    }
    app.post("/v1/chat/completions", tags=["chat"], **chat_doc)(chat)
    # FastChat's path for the same API (it added repetition_penalty, which we accept everywhere).
    app.post("/api/v1/chat/completions", tags=["chat"], **chat_doc)(chat)

    @app.post(
        "/v1/completions",
        tags=["completions"],
        openapi_extra=openapi.body(openapi.completion(settings.limits)),
        responses=openapi.ERROR_RESPONSES,
    )
    async def completions(request: Request) -> Response:
        return await generate(request, COMPLETION)

    async def _embeddings(request: Request, model: str | None) -> Response:
        body = await read_json(request, settings.max_body_bytes)
        message = convert.embedding_request(body, model)
        reply = await cancel_on_disconnect(
            request,
            stub(request).CreateEmbedding(
                message, metadata=_metadata(request), timeout=request_timeout(request, False)
            ),
        )
        return json_response(render.embeddings(reply, message.encoding_format))

    embedding_doc: dict[str, Any] = {
        "openapi_extra": openapi.body(openapi.EMBEDDING),
        "responses": openapi.ERROR_RESPONSES,
    }

    @app.post("/v1/embeddings", tags=["embeddings"], **embedding_doc)
    async def embeddings(request: Request) -> Response:
        return await _embeddings(request, None)

    @app.post("/v1/engines/{model}/embeddings", tags=["embeddings"], **embedding_doc)
    async def engine_embeddings(model: str, request: Request) -> Response:
        return await _embeddings(request, model)

    @app.post(
        "/api/v1/token_check",
        tags=["tokens"],
        openapi_extra=openapi.body(openapi.TOKEN_CHECK),
        responses=openapi.ERROR_RESPONSES,
    )
    async def token_check(request: Request) -> Response:
        body = await read_json(request, settings.max_body_bytes)
        reply = await stub(request).CheckTokens(convert.token_check_request(body), metadata=_metadata(request))
        return json_response(render.token_check(reply))

    @app.get("/v1/status", tags=["operations"], responses=openapi.ERROR_RESPONSES)
    async def cluster_status(request: Request) -> Response:
        """Each model and its live workers' load and health (no worker addresses or ids)."""
        reply = await stub(request).GetStatus(api_pb2.GetStatusRequest(), metadata=_metadata(request), timeout=10)
        return json_response(status.status(reply))

    page.add_page(app)

    @app.post(
        "/tokenize", tags=["tokens"], openapi_extra=openapi.body(openapi.TOKENIZE), responses=openapi.ERROR_RESPONSES
    )
    async def tokenize(request: Request) -> Response:
        """vLLM's tokenize: the ids of a prompt, or of messages in the model's chat template."""
        body = await read_json(request, settings.max_body_bytes)
        reply = await stub(request).Tokenize(convert.tokenize_request(body), metadata=_metadata(request))
        return json_response(render.tokenize(reply))

    @app.post(
        "/detokenize",
        tags=["tokens"],
        openapi_extra=openapi.body(openapi.DETOKENIZE),
        responses=openapi.ERROR_RESPONSES,
    )
    async def detokenize(request: Request) -> Response:
        body = await read_json(request, settings.max_body_bytes)
        reply = await stub(request).Detokenize(convert.detokenize_request(body), metadata=_metadata(request))
        return json_response(render.detokenize(reply))

    store = responses.ResponseStore(settings.responses_store_size, settings.responses_store_bytes)
    app.state.responses = store
    responses.add_routes(app, store, settings.max_body_bytes, stub, settings.sse_keepalive_interval)
    return app
