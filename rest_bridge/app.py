"""The REST bridge: OpenAI's REST + SSE API mapped onto the gateway's gRPC.

One channel to the gateway for the app's lifetime. ``Authorization`` goes
through as gRPC metadata: the gateway checks keys, so both fronts are
protected alike. Errors come back as gRPC statuses and leave here as OpenAI's
error envelope with the canonical HTTP status. A client that disconnects
cancels its gRPC call, which cancels the worker's generation.

Each API is a router of its own; what they share is in rest_bridge/exchange.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import Response
from grpc_health.v1 import health_pb2_grpc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from common import tracing
from common.errors import ApiError
from common.grpc_server import open_channel
from common.store import Store
from rest_bridge import batches, embeddings, generation, metrics, models, operations, origins, page, tokens
from rest_bridge.config import BridgeSettings
from rest_bridge.exchange import ClientGone, error_response, json_response
from rest_bridge.middleware import RequestMiddleware
from rest_bridge.responses import routes as responses
from rest_bridge.responses.store import MemoryResponseStore, RedisResponseStore
from tokenwire.v1 import api_pb2_grpc, batch_pb2_grpc

traced = tracing.part("bridge")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The channel to the gateway, and the shared store if any, for the app's lifetime."""
    settings: BridgeSettings = app.state.settings
    shared = Store(settings.store, "bridge", metrics.REGISTRY) if settings.store is not None else None
    if shared is None:
        app.state.responses = MemoryResponseStore(*settings.responses_store_bounds)
    else:
        app.state.responses = RedisResponseStore(shared, *settings.responses_store_bounds)
        await shared.start()  # after its scripts are made: it loads them
    try:
        address = settings.gateway_address
        async with open_channel(address, traced.channel_interceptors(address)) as channel:
            app.state.stub = api_pb2_grpc.InferenceServiceStub(channel)
            app.state.batch_stub = batch_pb2_grpc.BatchServiceStub(channel)
            app.state.health = health_pb2_grpc.HealthStub(channel)
            yield
    finally:
        if shared is not None:
            await shared.close()


def create_app(settings: BridgeSettings | None = None) -> FastAPI:
    settings = settings or BridgeSettings()
    app = FastAPI(title="tokenwire", version="0.1.0", lifespan=_lifespan, telemetry=traced.fastapi_telemetry())
    app.state.settings = settings
    origins.install(app, settings)  # inside RequestMiddleware: refusals are logged and counted too
    app.add_middleware(RequestMiddleware)

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

    for router in (
        operations.router,
        models.router,
        generation.router(settings.limits),
        embeddings.router,
        tokens.router,
        page.router,
        responses.router,
        batches.router,
    ):
        # The routers' own routes, not include_router: FastAPI (0.165) keeps an included
        # router as a nested one, and matching through seven costs ~50 us a request.
        app.router.routes.extend(router.routes)
    return app
