"""``/v1/responses``: create (unary or streamed), retrieve, list input items, delete."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from common import errors
from rest_bridge import convert, exchange, openapi
from rest_bridge.responses.events import EventStream
from rest_bridge.responses.output import Turn, from_completion, new_id
from rest_bridge.responses.request import parse_request, require_str
from rest_bridge.responses.store import ResponseStore, Stored, owner_of
from tokenwire.v1 import api_pb2

router = APIRouter(tags=["responses"], responses=openapi.ERROR_RESPONSES)


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


async def check_key(request: Request) -> None:
    """Let the gateway judge the key (401 as for any call) before the store answers."""
    await exchange.gateway_stub(request).ListModels(
        api_pb2.ListModelsRequest(), metadata=exchange.call_metadata(request)
    )


async def lookup(request: Request, response_id: str, param: str | None) -> Stored:
    stored = _store(request).get(response_id, owner_of(request.headers.get("authorization")))
    if stored is None:
        await check_key(request)  # a wrong key is a 401, not a 404
        raise errors.response_not_found(response_id, param)
    return stored


@router.post("/v1/responses", openapi_extra=openapi.body(openapi.RESPONSE))
async def create_response(request: Request) -> Response:
    body = await exchange.read_json(request)
    previous_id = body.get("previous_response_id")
    previous = None
    if previous_id is not None:
        previous = await lookup(request, require_str(previous_id, "previous_response_id"), "previous_response_id")
    parsed = parse_request(body, previous)
    message = convert.chat_request(parsed.chat)
    turn = Turn(new_id("resp"), int(time.time()), parsed.echo)
    owner = owner_of(request.headers.get("authorization"))
    history = [*(previous.history if previous else []), *parsed.new_input.messages]

    def keep() -> None:
        if parsed.store:
            _store(request).put(owner, turn.response(), [*history, turn.history_message()], parsed.new_input.items)

    timeout = exchange.request_timeout(request, parsed.stream)
    gateway = exchange.gateway_stub(request)
    if not parsed.stream:
        call = gateway.CreateChatCompletion(message, metadata=exchange.call_metadata(request), timeout=timeout)
        from_completion(turn, await exchange.cancel_on_disconnect(request, call))
        keep()
        return exchange.json_response(turn.response())

    stream_call = gateway.StreamChatCompletion(
        api_pb2.StreamChatCompletionRequest(request=message, stream_options=api_pb2.StreamOptions(include_usage=True)),
        metadata=exchange.call_metadata(request),
        timeout=timeout,
    )
    events = EventStream(turn)

    def finish() -> bytes:
        final = events.finish()
        keep()
        return final

    return await exchange.open_stream(
        request, stream_call, exchange.SseEvents(events.chunk, opening=events.start(), finish=finish, fail=events.fail)
    )


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> Response:
    """A stored response (this bridge's store; see the README)."""
    stored = await lookup(request, response_id, None)
    await check_key(request)
    return exchange.json_response(stored.response)


@router.get("/v1/responses/{response_id}/input_items", openapi_extra=openapi.INPUT_ITEMS_QUERY)
async def list_input_items(response_id: str, request: Request) -> Response:
    """The input items of a stored response (this request's own, not earlier turns').

    Query: ``order`` (asc | desc, default desc), ``limit`` (1-100, default 20), ``after`` (an item id).
    """
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise errors.invalid_request("'order' must be asc or desc.", "order")
    limit_text = query.get("limit", "20")
    limit = int(limit_text) if limit_text.isascii() and limit_text.isdigit() and len(limit_text) < 4 else 0
    if not 1 <= limit <= 100:
        raise errors.invalid_request("'limit' must be an integer between 1 and 100.", "limit")
    after = query.get("after")
    stored = await lookup(request, response_id, None)
    await check_key(request)
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return exchange.json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> Response:
    await lookup(request, response_id, None)
    await check_key(request)
    _store(request).delete(response_id, owner_of(request.headers.get("authorization")))
    return exchange.json_response({"id": response_id, "object": "response", "deleted": True})
