"""A Responses request, checked, as a chat completion body and what the response echoes back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from common import errors
from rest_bridge import exchange
from rest_bridge.responses.output import new_id
from rest_bridge.responses.store import Stored

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
# Request fields copied to the chat request unchanged (tokenwire's extensions included).
PASSTHROUGH = ("model", "temperature", "top_p", "user", "parallel_tool_calls", "top_k", "min_p", "seed")
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


def require_str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise errors.invalid_request(f"'{param}' must be a string.", param)
    return value


def _objects(value: list[Any], param: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each item of a list with its param (``input[2]``), checked to be an object."""
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise errors.invalid_request(f"'{where}' must be an object.", where)
        yield where, item


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """A message's content: a string, or text parts (input_text / output_text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise errors.invalid_request(f"'{param}' must be a string or a list of content parts.", param)
    parts = []
    for where, part in _objects(content, param):
        kind = part.get("type")
        if kind in TEXT_PARTS:
            parts.append({"type": "text", "text": require_str(part.get("text"), f"{where}.text")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": require_str(part.get("refusal"), f"{where}.refusal")})
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


@dataclass
class Input:
    """``input`` read once: as chat messages, and as the items ``input_items`` lists."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    # Typed, with ids, a message's text as parts.
    items: list[dict[str, Any]] = field(default_factory=list)


def read_input(value: Any, param: str = "input") -> Input:
    """``input`` (a string or a list of items), checked, as chat messages and as items."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise errors.invalid_request(f"'{param}' must be a string or a list of input items.", param)
    read = Input()
    previous_kind = None
    for where, item in _objects(value, param):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise errors.invalid_request(f"'{where}.role' must be one of {', '.join(ROLES)}.", f"{where}.role")
            content = item.get("content")
            read.messages.append({"role": role, "content": _content(content, f"{where}.content")})
            if isinstance(content, str):
                content = [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
            read.items.append(
                {
                    "id": item.get("id") or new_id("msg"),
                    "type": "message",
                    "role": role,
                    "status": "completed",
                    "content": content,
                }
            )
        elif kind == "function_call":
            call = {
                "id": _call_id(item, where),
                "type": "function",
                "function": {
                    "name": require_str(item.get("name"), f"{where}.name"),
                    "arguments": require_str(item.get("arguments", ""), f"{where}.arguments"),
                },
            }
            if previous_kind == "function_call":  # parallel calls: one assistant turn
                read.messages[-1]["tool_calls"].append(call)
            else:
                read.messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            read.items.append({**item, "id": item.get("id") or new_id("fc"), "status": "completed"})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _content(output, f"{where}.output")
            read.messages.append({"role": "tool", "tool_call_id": _call_id(item, where), "content": content})
            read.items.append({**item, "id": item.get("id") or new_id("fco"), "status": "completed"})
        else:
            raise errors.invalid_request(
                f"Input items of type '{kind}' are not supported; use message, function_call and function_call_output.",
                f"{where}.type",
            )
        previous_kind = kind
    return read


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise errors.invalid_request("'tools' must be a list of tools.", "tools")
    tools = []
    for where, tool in _objects(value, "tools"):
        kind = tool.get("type")
        if kind != "function":
            raise errors.invalid_request(
                f"The tool type '{kind}' is not supported: tokenwire serves function tools only "
                "(built-in tools such as web_search, file_search and computer_use are not available).",
                f"{where}.type",
            )
        function: dict[str, Any] = {"name": require_str(tool.get("name"), f"{where}.name")}
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
            return {"type": "function", "function": {"name": require_str(value.get("name"), "tool_choice.name")}}
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
    # What this request adds to the conversation (instructions excluded:
    # OpenAI does not carry them over to the next response).
    new_input: Input
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
    new_input = read_input(body.get("input", []))
    instructions = body.get("instructions")
    head: list[dict[str, Any]] = []
    if isinstance(instructions, str):
        head = [{"role": "system", "content": instructions}]
    elif instructions is not None:
        head = read_input(instructions, "instructions").messages
    history = previous.history if previous is not None else []
    chat: dict[str, Any] = {k: body[k] for k in PASSTHROUGH if body.get(k) is not None}
    chat["messages"] = [*head, *history, *new_input.messages]
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
    if store is not None and not isinstance(store, bool):
        raise errors.invalid_request("'store' must be a boolean.", "store")
    stream = exchange.stream_flag(body)
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
    return ResponseRequest(chat, new_input, echo, store is not False, stream)
