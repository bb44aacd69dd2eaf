"""``GET /v1/models`` and ``GET /v1/models/{id}``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from rest_bridge import exchange, render
from tokenwire.v1 import api_pb2

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    reply = await exchange.gateway_stub(request).ListModels(
        api_pb2.ListModelsRequest(), metadata=exchange.call_metadata(request)
    )
    return exchange.json_response(render.models(reply))


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> Response:
    reply = await exchange.gateway_stub(request).GetModel(
        api_pb2.GetModelRequest(model=model), metadata=exchange.call_metadata(request)
    )
    return exchange.json_response(render.model(reply.model))
