"""Counting and converting tokens: FastChat's ``POST /api/v1/token_check``, vLLM's ``/tokenize`` and ``/detokenize``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from rest_bridge import convert, exchange, openapi, render

router = APIRouter(tags=["tokens"], responses=openapi.ERROR_RESPONSES)


async def _call(
    request: Request, rpc: str, parse: Callable[[dict[str, Any]], Any], answer: Callable[[Any], dict[str, Any]]
) -> Response:
    """The JSON body as ``rpc``'s request, and its reply as JSON."""
    message = parse(await exchange.read_json(request))
    reply = await getattr(exchange.gateway_stub(request), rpc)(message, metadata=exchange.call_metadata(request))
    return exchange.json_response(answer(reply))


@router.post("/api/v1/token_check", openapi_extra=openapi.body(openapi.TOKEN_CHECK))
async def token_check(request: Request) -> Response:
    return await _call(request, "CheckTokens", convert.token_check_request, render.token_check)


@router.post("/tokenize", openapi_extra=openapi.body(openapi.TOKENIZE))
async def tokenize(request: Request) -> Response:
    """vLLM's tokenize: the ids of a prompt, or of messages in the model's chat template."""
    return await _call(request, "Tokenize", convert.tokenize_request, render.tokenize)


@router.post("/detokenize", openapi_extra=openapi.body(openapi.DETOKENIZE))
async def detokenize(request: Request) -> Response:
    return await _call(request, "Detokenize", convert.detokenize_request, render.detokenize)
