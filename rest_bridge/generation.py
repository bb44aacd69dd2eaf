"""``POST /v1/chat/completions`` (and FastChat's ``/api/v1/chat/completions``) and ``POST /v1/completions``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from common.sampling import Limits
from rest_bridge import convert, openapi, render
from rest_bridge.exchange import (
    SseEvents,
    call_metadata,
    cancel_on_disconnect,
    gateway_stub,
    json_response,
    open_stream,
    read_json,
    request_timeout,
    sse,
    stream_flag,
)
from tokenwire.v1 import api_pb2


@dataclass(frozen=True)
class GenerationApi:
    """How one generation endpoint maps onto the gateway's RPCs."""

    parse: Callable[[dict[str, Any]], Any]
    unary_rpc: str
    stream_rpc: str
    stream_request: type
    render: Callable[[Any], dict[str, Any]]
    render_chunk: Callable[[Any, bool], dict[str, Any]]


CHAT = GenerationApi(
    parse=convert.chat_request,
    unary_rpc="CreateChatCompletion",
    stream_rpc="StreamChatCompletion",
    stream_request=api_pb2.StreamChatCompletionRequest,
    render=render.chat_completion,
    render_chunk=render.chat_chunk,
)
COMPLETION = GenerationApi(
    parse=convert.completion_request,
    unary_rpc="CreateCompletion",
    stream_rpc="StreamCompletion",
    stream_request=api_pb2.StreamCompletionRequest,
    render=render.completion,
    render_chunk=render.completion_chunk,
)


async def generate(request: Request, api: GenerationApi) -> Response:
    body = await read_json(request)
    message = api.parse(body)
    streaming = stream_flag(body)
    timeout = request_timeout(request, streaming)
    gateway = gateway_stub(request)
    if streaming:
        options = convert.stream_options(body)
        include_usage = options.include_usage
        call = getattr(gateway, api.stream_rpc)(
            api.stream_request(request=message, stream_options=options),
            metadata=call_metadata(request),
            timeout=timeout,
        )
        return await open_stream(request, call, SseEvents(lambda c: sse(api.render_chunk(c, include_usage))))
    rpc = getattr(gateway, api.unary_rpc)
    reply = await cancel_on_disconnect(request, rpc(message, metadata=call_metadata(request), timeout=timeout))
    return json_response(api.render(reply))


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
