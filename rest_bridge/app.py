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
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from grpc_health.v1 import health_pb2_grpc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from common.errors import ApiError
from common.grpc_server import open_channel
from rest_bridge import embeddings, generation, models, operations, page, tokens
from rest_bridge.config import BridgeSettings
from rest_bridge.exchange import ClientGone, error_response, json_response
from rest_bridge.middleware import RequestMiddleware
from rest_bridge.responses import routes as responses
from rest_bridge.responses.store import ResponseStore
from tokenwire.v1 import api_pb2_grpc


@contextlib.asynccontextmanager
async def _gateway_channel(app: FastAPI) -> AsyncIterator[None]:
    async with open_channel(app.state.settings.gateway_address) as channel:
        app.state.stub = api_pb2_grpc.InferenceServiceStub(channel)
        app.state.health = health_pb2_grpc.HealthStub(channel)
        yield


def create_app(settings: BridgeSettings | None = None) -> FastAPI:
    settings = settings or BridgeSettings()
    app = FastAPI(title="tokenwire", version="0.1.0", lifespan=_gateway_channel)
    app.state.settings = settings
    app.state.responses = ResponseStore(settings.responses_store_size, settings.responses_store_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_credentials=settings.allow_credentials,
        allow_methods=settings.allowed_methods,
        allow_headers=settings.allowed_headers,
        expose_headers=["X-Request-Id"],
    )
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
    ):
        # The routers' own routes, not include_router: FastAPI (0.165) keeps an included
        # router as a nested one, and matching through seven costs ~50 us a request.
        app.router.routes.extend(router.routes)
    return app
