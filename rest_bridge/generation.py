"""``POST /v1/chat/completions`` (and FastChat's ``/api/v1/chat/completions``) and ``POST /v1/completions``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from common.sampling import Limits
from rest_bridge import convert, exchange, openapi, render
from tokenwire.v1 import api_pb2


@dataclass(frozen=True)
class GenerationApi:
    """How one generation endpoint maps onto the gateway's RPCs: ``Create<rpc>``, and
    ``Stream<rpc>`` taking a ``Stream<rpc>Request``."""

    rpc: str
    parse: Callable[[dict[str, Any]], Any]
    render: Callable[[Any], dict[str, Any]]
    render_chunk: Callable[[Any, bool], dict[str, Any]]


CHAT = GenerationApi("ChatCompletion", convert.chat_request, render.chat_completion, render.chat_chunk)
COMPLETION = GenerationApi("Completion", convert.completion_request, render.completion, render.completion_chunk)


async def generate(request: Request, api: GenerationApi) -> Response:
    body = await exchange.read_json(request)
    message = api.parse(body)
    streaming = exchange.stream_flag(body)
    timeout = exchange.request_timeout(request, streaming)
    gateway = exchange.gateway_stub(request)
    if streaming:
        options = convert.stream_options(body)
        include_usage = options.include_usage
        stream_request = getattr(api_pb2, f"Stream{api.rpc}Request")
        call = getattr(gateway, f"Stream{api.rpc}")(
            stream_request(request=message, stream_options=options),
            metadata=exchange.call_metadata(request),
            timeout=timeout,
        )
        return await exchange.open_stream(
            request, call, exchange.SseEvents(lambda c: exchange.sse(api.render_chunk(c, include_usage)))
        )
    rpc = getattr(gateway, f"Create{api.rpc}")
    reply = await exchange.cancel_on_disconnect(
        request, rpc(message, metadata=exchange.call_metadata(request), timeout=timeout)
    )
    return exchange.json_response(api.render(reply))


async def chat(request: Request) -> Response:
    return await generate(request, CHAT)


async def completions(request: Request) -> Response:
    return await generate(request, COMPLETION)


def router(limits: Limits) -> APIRouter:
    """The routes, their /openapi.json bodies bounded by the gateway's --max-n and --max-tokens-limit."""
    router = APIRouter(responses=openapi.ERROR_RESPONSES)
    chat_body = openapi.body(openapi.chat(limits))
    router.post("/v1/chat/completions", tags=["chat"], openapi_extra=chat_body)(chat)
    # FastChat's path for the same API (it added repetition_penalty, which we accept everywhere).
    router.post("/api/v1/chat/completions", tags=["chat"], openapi_extra=chat_body)(chat)
    completion_body = openapi.body(openapi.completion(limits))
    router.post("/v1/completions", tags=["completions"], openapi_extra=completion_body)(completions)
    return router
