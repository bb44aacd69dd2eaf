"""``POST /v1/embeddings`` and FastChat's ``POST /v1/engines/{model}/embeddings``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from rest_bridge import convert, exchange, openapi, render

router = APIRouter(tags=["embeddings"], responses=openapi.ERROR_RESPONSES)
BODY = openapi.body(openapi.EMBEDDING)


async def _embeddings(request: Request, model: str | None) -> Response:
    message = convert.embedding_request(await exchange.read_json(request), model)
    call = exchange.gateway_stub(request).CreateEmbedding(
        message, metadata=exchange.call_metadata(request), timeout=exchange.request_timeout(request, False)
    )
    reply = await exchange.cancel_on_disconnect(request, call)
    return exchange.json_response(render.embeddings(reply, message.encoding_format))


@router.post("/v1/embeddings", openapi_extra=BODY)
async def embeddings(request: Request) -> Response:
    return await _embeddings(request, None)


@router.post("/v1/engines/{model}/embeddings", openapi_extra=BODY)
async def engine_embeddings(model: str, request: Request) -> Response:
    return await _embeddings(request, model)
