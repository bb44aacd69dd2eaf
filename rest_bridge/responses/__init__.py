"""OpenAI's Responses API (``/v1/responses``), translated onto the chat RPCs.

A request becomes one ``CreateChatCompletion`` / ``StreamChatCompletion``
call, as llama.cpp's server and LiteLLM do it: ``instructions`` a system
message first, then the conversation of ``previous_response_id``, then the
``input`` items (messages, ``function_call`` items as assistant tool calls,
``function_call_output`` items as tool messages). The chat answer comes back
as ``message`` / ``function_call`` output items; a stream becomes the
``response.*`` event sequence the SDK's ``client.responses.stream`` parses.

Stored responses (``store``, on by default as at OpenAI) live in this bridge
process, in an LRU bounded by count and bytes: the translation happens here and
the gateway's gRPC API has no Responses objects, so keeping the conversation
next to the code that builds it costs no extra hop. ``tokenwire serve`` runs one
bridge per gateway, so that is a store per gateway; several bridges in front
of one gateway each keep their own (route a conversation to one bridge). The
store is lost on restart. Each entry remembers a digest of the API key that
made it, and only that key sees it.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
import shortuuid
from fastapi import FastAPI, Request
from fastapi.responses import Response

from common import errors
from common.errors import ApiError
from rest_bridge import convert, keepalive, openapi
from tokenwire.v1 import api_pb2, api_pb2_grpc

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
# Request fields copied to the chat request unchanged (tokenwire's extensions included).
PASSTHROUGH = ("model", "temperature", "top_p", "user", "parallel_tool_calls", "top_k", "min_p", "seed")
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


def new_id(prefix: str) -> str:
    return f"{prefix}_{shortuuid.uuid()}"


def owner_of(authorization: str | None) -> bytes:
    """Whose a stored response is: a digest of the caller's key (scheme and spacing aside)."""
    token = (authorization or "").strip().partition(" ")[2].strip()
    return hashlib.sha256(token.encode()).digest()


# -- The store ------------------------------------------------------------------


@dataclass
class Stored:
    owner: bytes
    response: dict[str, Any]
    # The whole conversation as chat messages, this response's output included.
    history: list[dict[str, Any]]
    size: int
    # This request's own input, as Responses items with ids (for input_items).
    input_items: list[dict[str, Any]] = field(default_factory=list)


class ResponseStore:
    """An LRU of responses, bounded by count and by (JSON) bytes."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(
        self,
        owner: bytes,
        response: dict[str, Any],
        history: list[dict[str, Any]],
        input_items: list[dict[str, Any]] | None = None,
    ) -> None:
        items = input_items or []
        size = len(orjson.dumps(response)) + len(orjson.dumps(history)) + len(orjson.dumps(items))
        if self.max_count <= 0 or size > self.max_bytes:
            return  # larger than the whole store: not kept (a later lookup is a 404)
        self._drop(response["id"])
        self._items[response["id"]] = Stored(owner, response, history, size, items)
        self.bytes += size
        while len(self._items) > self.max_count or self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def get(self, response_id: str, owner: bytes) -> Stored | None:
        stored = self._items.get(response_id)
        if stored is None or stored.owner != owner:
            return None  # another key's response is as absent as a missing one
        self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str, owner: bytes) -> bool:
        if self.get(response_id, owner) is None:
            return False
        self._drop(response_id)
        return True

    def _drop(self, response_id: str) -> None:
        stored = self._items.pop(response_id, None)
        if stored is not None:
            self.bytes -= stored.size


# -- Request: Responses JSON -> a chat completion body ------------------------------


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise errors.invalid_request(f"'{param}' must be a string.", param)
    return value


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """A message's content: a string, or text parts (input_text / output_text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise errors.invalid_request(f"'{param}' must be a string or a list of content parts.", param)
    parts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise errors.invalid_request(f"'{where}' must be an object.", where)
        kind = part.get("type")
        if kind in TEXT_PARTS:
            parts.append({"type": "text", "text": _text(part.get("text"), f"{where}.text")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": _text(part.get("refusal"), f"{where}.refusal")})
        else:
            raise errors.invalid_request(
                f"Content parts of type '{kind}' are not supported; use input_text.", f"{where}.type"
            )
    return parts


def _call_id(item: dict[str, Any], param: str) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise errors.invalid_request(f"'{param}.call_id' must be a non-empty string.", f"{param}.call_id")
    return call_id


def input_messages(value: Any, param: str = "input") -> list[dict[str, Any]]:
    """``input`` (a string or a list of items) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise errors.invalid_request(f"'{param}' must be a string or a list of input items.", param)
    messages: list[dict[str, Any]] = []
    previous_kind = None
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise errors.invalid_request(f"'{where}' must be an object.", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise errors.invalid_request(f"'{where}.role' must be one of {', '.join(ROLES)}.", f"{where}.role")
            messages.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {
                "id": _call_id(item, where),
                "type": "function",
                "function": {
                    "name": _text(item.get("name"), f"{where}.name"),
                    "arguments": _text(item.get("arguments", ""), f"{where}.arguments"),
                },
            }
            if previous_kind == "function_call":  # parallel calls: one assistant turn
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _content(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _call_id(item, where), "content": content})
        else:
            raise errors.invalid_request(
                f"Input items of type '{kind}' are not supported; use message, function_call and function_call_output.",
                f"{where}.type",
            )
        previous_kind = kind
    return messages


def input_items(value: Any) -> list[dict[str, Any]]:
    """A valid ``input`` as the items ``input_items`` lists: typed, with ids, text as parts."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    out = []
    for item in value:
        kind = item.get("type", "message")
        if kind == "message":
            part = "output_text" if item["role"] == "assistant" else "input_text"
            content = item["content"]
            if isinstance(content, str):
                content = [{"type": part, "text": content}]
            out.append(
                {
                    "id": item.get("id") or new_id("msg"),
                    "type": "message",
                    "role": item["role"],
                    "status": "completed",
                    "content": content,
                }
            )
        else:
            prefix = "fc" if kind == "function_call" else "fco"
            out.append({**item, "id": item.get("id") or new_id(prefix), "status": "completed"})
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise errors.invalid_request("'tools' must be a list of tools.", "tools")
    tools = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise errors.invalid_request(f"'{where}' must be an object.", where)
        kind = tool.get("type")
        if kind != "function":
            raise errors.invalid_request(
                f"The tool type '{kind}' is not supported: tokenwire serves function tools only "
                "(built-in tools such as web_search, file_search and computer_use are not available).",
                f"{where}.type",
            )
        function: dict[str, Any] = {"name": _text(tool.get("name"), f"{where}.name")}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if value.get("type") == "function":
            return {"type": "function", "function": {"name": _text(value.get("name"), "tool_choice.name")}}
        raise errors.invalid_request(
            f"tool_choice of type '{value.get('type')}' is not supported; use none, auto, required or a function.",
            "tool_choice",
        )
    raise errors.invalid_request("'tool_choice' must be a string or an object.", "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        raise errors.invalid_request("'text' must be an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise errors.invalid_request("'text.format' must be an object.", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {"name": fmt.get("name") or "response", "schema": fmt.get("schema")}
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise errors.invalid_request(
        f"text.format of type '{kind}' is not supported; use text, json_object or json_schema.", "text.format.type"
    )


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    ok = isinstance(value, dict) and len(value) <= METADATA_KEYS
    ok = ok and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY_CHARS and len(v) <= METADATA_VALUE_CHARS
        for k, v in value.items()
    )
    if not ok:
        raise errors.invalid_request(
            f"'metadata' must be an object of at most {METADATA_KEYS} string values "
            f"(keys up to {METADATA_KEY_CHARS} characters, values up to {METADATA_VALUE_CHARS}).",
            "metadata",
        )
    return value


@dataclass
class ResponseRequest:
    """A parsed Responses request: the chat body to send and what to echo back."""

    chat: dict[str, Any]
    # The messages this request adds to the conversation (instructions excluded:
    # OpenAI does not carry them over to the next response).
    new_messages: list[dict[str, Any]]
    echo: dict[str, Any]
    store: bool
    stream: bool


def parse_request(body: dict[str, Any], previous: Stored | None) -> ResponseRequest:
    for name in ("background",):
        if body.get(name):
            raise errors.invalid_request(f"'{name}' is not supported.", name)
    for name in ("conversation", "prompt"):
        if body.get(name) is not None:
            raise errors.invalid_request(
                f"'{name}' is not supported; use previous_response_id for conversations.", name
            )
    if "input" not in body and previous is None:
        raise errors.invalid_request("'input' is required.", "input")
    new_messages = input_messages(body.get("input", []))
    instructions = body.get("instructions")
    head: list[dict[str, Any]] = []
    if isinstance(instructions, str):
        head = [{"role": "system", "content": instructions}]
    elif instructions is not None:
        head = input_messages(instructions, "instructions")
    history = previous.history if previous is not None else []
    chat: dict[str, Any] = {k: body[k] for k in PASSTHROUGH if body.get(k) is not None}
    chat["messages"] = [*head, *history, *new_messages]
    if not chat["messages"]:
        raise errors.invalid_request("'input' must not be empty.", "input")
    limit = body.get("max_output_tokens")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise errors.invalid_request("'max_output_tokens' must be a positive integer.", "max_output_tokens")
        chat["max_completion_tokens"] = limit
    tools = _tools(body["tools"]) if body.get("tools") is not None else []
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    text = body.get("text")
    fmt = _response_format(text) if text is not None else None
    if fmt is not None:
        chat["response_format"] = fmt
    store = body.get("store", True)
    stream = body.get("stream", False)
    for name, value in (("store", store), ("stream", stream)):
        if value is not None and not isinstance(value, bool):
            raise errors.invalid_request(f"'{name}' must be a boolean.", name)
    echo = {
        "model": body.get("model"),
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": _metadata(body.get("metadata")),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": (text or {}).get("format") or {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "user": body.get("user"),
        "store": store is not False,
    }
    return ResponseRequest(chat, new_messages, echo, store is not False, bool(stream))


# -- Response: chat output -> Responses objects -----------------------------------


@dataclass
class Turn:
    """The assistant's answer as it accumulates: text, tool calls, finish, usage."""

    response_id: str
    created_at: int
    echo: dict[str, Any]
    message_id: str = field(default_factory=lambda: new_id("msg"))
    text: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    finish: str = ""
    usage: dict[str, Any] | None = None

    @property
    def incomplete(self) -> bool:
        return self.finish == "length"

    def message_item(self, status: str, text: str | None = None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def add_call(self, call_id: str, name: str, arguments: str) -> dict[str, Any]:
        item = {
            "id": new_id("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
        }
        self.calls.append(item)
        return item

    def output(self) -> list[dict[str, Any]]:
        text = "".join(self.text)
        items = []
        if text or not self.calls:
            items.append(self.message_item("incomplete" if self.incomplete else "completed", text))
        return [*items, *self.calls]

    def set_usage(self, prompt: int, completion: int) -> None:
        self.usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }

    def response(self, status: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object: in progress (``status``), failed, or final."""
        if status is None:
            status = "incomplete" if self.incomplete else "completed"
        final = status in ("completed", "incomplete")
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "output": self.output() if final else [],
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "truncation": "disabled",
            "usage": self.usage if final else None,
            **self.echo,
        }

    def history_message(self) -> dict[str, Any]:
        """This answer as the chat message a follow-up request replays."""
        text = "".join(self.text)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not self.calls else None}
        if self.calls:
            message["tool_calls"] = [
                {"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.calls
            ]
        return message


def from_completion(turn: Turn, reply: api_pb2.CreateChatCompletionResponse) -> Turn:
    choice = reply.choices[0]
    if choice.message.HasField("content"):
        turn.text.append(choice.message.content)
    for call in choice.message.tool_calls:
        turn.add_call(call.id, call.function.name, call.function.arguments)
    turn.finish = choice.finish_reason
    turn.set_usage(reply.usage.prompt_tokens, reply.usage.completion_tokens)
    return turn


class EventStream:
    """Chat chunks in, ``response.*`` server-sent events out, each numbered."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.sequence = 0
        self.message_index: int | None = None  # output index of the open message item
        self.items = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def start(self) -> list[bytes]:
        snapshot = self.turn.response("in_progress")
        return [
            self.event("response.created", response=snapshot),
            self.event("response.in_progress", response=snapshot),
        ]

    def _text_ids(self) -> dict[str, Any]:
        return {"item_id": self.turn.message_id, "output_index": self.message_index, "content_index": 0}

    def _open_message(self) -> list[bytes]:
        self.message_index, self.items = self.items, self.items + 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self.event(
                "response.output_item.added",
                output_index=self.message_index,
                item=self.turn.message_item("in_progress"),
            ),
            self.event("response.content_part.added", part=part, **self._text_ids()),
        ]

    def _close_message(self) -> list[bytes]:
        if self.message_index is None:
            return []
        text = "".join(self.turn.text)
        status = "incomplete" if self.turn.incomplete else "completed"
        item = self.turn.message_item(status, text)
        out = [
            self.event("response.output_text.done", text=text, logprobs=[], **self._text_ids()),
            self.event("response.content_part.done", part=item["content"][0], **self._text_ids()),
            self.event("response.output_item.done", output_index=self.message_index, item=item),
        ]
        self.message_index = None
        return out

    def chunk(self, chunk: api_pb2.StreamChatCompletionResponse) -> list[bytes]:
        out: list[bytes] = []
        if chunk.HasField("usage"):
            self.turn.set_usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            delta = choice.delta
            if delta.HasField("content") and delta.content:
                if self.message_index is None:
                    out += self._open_message()
                self.turn.text.append(delta.content)
                out.append(
                    self.event("response.output_text.delta", delta=delta.content, logprobs=[], **self._text_ids())
                )
            for call in delta.tool_calls:
                out += self._close_message()
                item = self.turn.add_call(call.id, call.function.name, call.function.arguments)
                index, self.items = self.items, self.items + 1
                ids = {"item_id": item["id"], "output_index": index}
                out += [
                    self.event(
                        "response.output_item.added",
                        output_index=index,
                        item={**item, "arguments": "", "status": "in_progress"},
                    ),
                    self.event("response.function_call_arguments.delta", delta=item["arguments"], **ids),
                    self.event(
                        "response.function_call_arguments.done", arguments=item["arguments"], name=item["name"], **ids
                    ),
                    self.event("response.output_item.done", output_index=index, item=item),
                ]
            if choice.HasField("finish_reason"):
                self.turn.finish = choice.finish_reason
        return out

    def finish(self) -> list[bytes]:
        out = []
        if self.message_index is None and not self.turn.calls:
            out += self._open_message()  # an empty answer is still one message, as in the unary output
        out += self._close_message()
        response = self.turn.response()
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return [*out, self.event(kind, response=response)]

    def fail(self, error: ApiError) -> list[bytes]:
        code = error.code or error.type
        failed = self.turn.response("failed", {"code": code, "message": error.message})
        return [
            self.event("error", code=code, message=error.message, param=error.param),
            self.event("response.failed", response=failed),
        ]


# -- Routes -----------------------------------------------------------------------


def add_routes(
    app: FastAPI,
    store: ResponseStore,
    max_body_bytes: int,
    stub: Callable[[Request], api_pb2_grpc.InferenceServiceStub],
    keepalive_interval: float = 0.0,
) -> None:
    # The bridge's request plumbing (imported here: rest_bridge.app imports this module).
    from rest_bridge.app import SSE_HEADERS, cancel_on_disconnect, json_response, read_json, request_timeout
    from rest_bridge.app import _metadata as call_metadata

    async def check_key(request: Request) -> None:
        """Let the gateway judge the key (401 as for any call) before the store answers."""
        await stub(request).ListModels(api_pb2.ListModelsRequest(), metadata=call_metadata(request))

    async def lookup(request: Request, response_id: str, param: str | None) -> Stored:
        owner = owner_of(request.headers.get("authorization"))
        stored = store.get(response_id, owner)
        if stored is None:
            await check_key(request)  # a wrong key is a 401, not a 404
            raise errors.response_not_found(response_id, param)
        return stored

    @app.post(
        "/v1/responses",
        tags=["responses"],
        openapi_extra=openapi.body(openapi.RESPONSE),
        responses=openapi.ERROR_RESPONSES,
    )
    async def create_response(request: Request) -> Response:
        body = await read_json(request, max_body_bytes)
        previous_id = body.get("previous_response_id")
        previous = None
        if previous_id is not None:
            previous = await lookup(request, _text(previous_id, "previous_response_id"), "previous_response_id")
        parsed = parse_request(body, previous)
        message = convert.chat_request(parsed.chat)
        turn = Turn(new_id("resp"), int(time.time()), parsed.echo)
        owner = owner_of(request.headers.get("authorization"))
        history = [*(previous.history if previous else []), *parsed.new_messages]

        def keep() -> None:
            if parsed.store:
                items = input_items(body.get("input", []))
                store.put(owner, turn.response(), [*history, turn.history_message()], items)

        timeout = request_timeout(request, parsed.stream)
        gateway = stub(request)
        if not parsed.stream:
            call = gateway.CreateChatCompletion(message, metadata=call_metadata(request), timeout=timeout)
            from_completion(turn, await cancel_on_disconnect(request, call))
            keep()
            return json_response(turn.response())

        stream_call = gateway.StreamChatCompletion(
            api_pb2.StreamChatCompletionRequest(
                request=message, stream_options=api_pb2.StreamOptions(include_usage=True)
            ),
            metadata=call_metadata(request),
            timeout=timeout,
        )
        iterator = stream_call.__aiter__()
        # Errors before the first chunk are plain HTTP errors (unless it waits past the keep-alive interval).
        first = await keepalive.first_message(iterator, keepalive_interval)
        events = EventStream(turn)

        async def body_events() -> AsyncIterator[bytes]:
            try:
                for event in events.start():
                    yield event
                chunk = await first
                if chunk is not None:
                    for event in events.chunk(chunk):
                        yield event
                    async for chunk in iterator:
                        for event in events.chunk(chunk):
                            yield event
                final = events.finish()
                keep()
                for event in final:
                    yield event
            except grpc.aio.AioRpcError as error:
                for event in events.fail(ApiError.from_rpc_error(error)):
                    yield event
            finally:
                first.cancel()
                stream_call.cancel()

        return keepalive.KeepAliveResponse(body_events(), keepalive_interval, SSE_HEADERS)

    @app.get("/v1/responses/{response_id}", tags=["responses"], responses=openapi.ERROR_RESPONSES)
    async def get_response(response_id: str, request: Request) -> Response:
        """A stored response (this bridge's store; see the README)."""
        stored = await lookup(request, response_id, None)
        await check_key(request)
        return json_response(stored.response)

    @app.get(
        "/v1/responses/{response_id}/input_items",
        tags=["responses"],
        openapi_extra=openapi.INPUT_ITEMS_QUERY,
        responses=openapi.ERROR_RESPONSES,
    )
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
        return json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit,
            }
        )

    @app.delete("/v1/responses/{response_id}", tags=["responses"], responses=openapi.ERROR_RESPONSES)
    async def delete_response(response_id: str, request: Request) -> Response:
        await lookup(request, response_id, None)
        await check_key(request)
        store.delete(response_id, owner_of(request.headers.get("authorization")))
        return json_response({"id": response_id, "object": "response", "deleted": True})
