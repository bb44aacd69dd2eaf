"""OpenAI's JSON objects and the tokenwire.v1 messages that mirror them, in one place.

Two parts speak OpenAI JSON: the REST bridge (it renders responses for clients)
and the openai engine (it writes requests to an upstream and reads its streamed
answers back). Each OpenAI shape is converted here once, both directions side by
side where both are needed, so the two parts cannot drift apart.

Written out by hand rather than with ``MessageToDict``: OpenAI wants explicit
``null``s, integers (not int64 strings) and a few legacy shapes. Request
*parsing* (JSON -> proto with OpenAI-style type errors) is in
``openai_requests.py``, for untrusted JSON (the bridge's bodies, batch input files).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format

from tokenwire.v1 import api_pb2, common_pb2

# -- Usage -----------------------------------------------------------------------


def usage(u: common_pb2.Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }
    if u.HasField("prompt_tokens_details"):  # unset: the engine did not say what it reused
        out["prompt_tokens_details"] = {"cached_tokens": u.prompt_tokens_details.cached_tokens}
    return out


# -- Messages and tools (requests) ------------------------------------------------


def tool_call(call: common_pb2.ToolCall | api_pb2.ToolCallDelta) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": call.type or "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }


def message(m: common_pb2.ChatMessage) -> dict[str, Any]:
    """A ChatMessage as OpenAI's JSON message (the inverse of the bridge's parsing)."""
    out: dict[str, Any] = {"role": m.role}
    which = m.WhichOneof("content_kind")
    if which == "content":
        out["content"] = m.content
    elif which == "content_parts":
        parts: list[dict[str, Any]] = []
        for part in m.content_parts.parts:
            if part.type == "image_url":
                image: dict[str, Any] = {"url": part.image_url.url}
                if part.image_url.detail:
                    image["detail"] = part.image_url.detail
                parts.append({"type": "image_url", "image_url": image})
            else:
                parts.append({"type": part.type, "text": part.text})
        out["content"] = parts
    else:
        out["content"] = None  # an assistant turn that only calls tools
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [tool_call(call) for call in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _struct(value: Any) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def _definition(m: common_pb2.FunctionDefinition | common_pb2.JsonSchema, schema_field: str) -> dict[str, Any]:
    """A function or a JSON schema: its name, and description, schema and strict where set."""
    out: dict[str, Any] = {"name": m.name}
    if m.description:
        out["description"] = m.description
    if m.HasField(schema_field):  # type: ignore[arg-type]
        out[schema_field] = _struct(getattr(m, schema_field))
    if m.HasField("strict"):
        out["strict"] = m.strict
    return out


def tool(t: common_pb2.Tool) -> dict[str, Any]:
    return {"type": t.type or "function", "function": _definition(t.function, "parameters")}


def tool_choice(choice: common_pb2.ToolChoice) -> str | dict[str, Any] | None:
    """OpenAI's tool_choice: a mode string, a named function, or None when unset."""
    which = choice.WhichOneof("kind")
    if which == "mode":
        return choice.mode
    if which == "function":
        return {"type": "function", "function": {"name": choice.function.function.name}}
    return None


def response_format(fmt: common_pb2.ResponseFormat) -> dict[str, Any]:
    out: dict[str, Any] = {"type": fmt.type}
    if fmt.type == "json_schema":
        out["json_schema"] = _definition(fmt.json_schema, "schema")
    return out


# -- Logprobs (both directions) ----------------------------------------------------


def _top(t: common_pb2.TopLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}


def token_logprobs(entries: Iterable[common_pb2.TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content``: one object per token."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob if e.HasField("logprob") else None,
            "bytes": list(e.bytes),
            "top_logprobs": [_top(t) for t in e.top_logprobs],
        }
        for e in entries
    ]


def _bytes(item: dict[str, Any]) -> bytes:
    raw = item.get("bytes")
    return bytes(raw) if raw else str(item.get("token", "")).encode()


def token_logprobs_from_json(data: Any) -> list[common_pb2.TokenLogprob]:
    """Chat's ``logprobs`` object (``{"content": [...]}``) back to entries."""
    out = []
    for item in (data or {}).get("content") or []:
        entry = common_pb2.TokenLogprob(token=item.get("token", ""), bytes=_bytes(item))
        if item.get("logprob") is not None:
            entry.logprob = item["logprob"]
        for top in item.get("top_logprobs") or []:
            entry.top_logprobs.add(token=top.get("token", ""), logprob=top.get("logprob") or 0.0, bytes=_bytes(top))
        out.append(entry)
    return out


def legacy_logprobs(entries: Iterable[common_pb2.TokenLogprob]) -> dict[str, Any]:
    """Completions' logprobs: parallel arrays, top alternatives as {token: logprob}."""
    entries = list(entries)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob if e.HasField("logprob") else None for e in entries],
        "top_logprobs": [_legacy_top(e) for e in entries],
        "text_offset": [e.text_offset for e in entries],
    }


def _legacy_top(entry: common_pb2.TokenLogprob) -> dict[str, float] | None:
    """The alternatives and, as OpenAI documents for completions (up to ``logprobs + 1``, so with
    ``logprobs: 0`` too), the sampled token; None for an echoed first token, which nothing predicted."""
    if not entry.HasField("logprob"):
        return None
    top = {t.token: t.logprob for t in entry.top_logprobs}
    top.setdefault(entry.token, entry.logprob)
    return top


def legacy_logprobs_from_json(data: Any) -> list[common_pb2.TokenLogprob]:
    """Completions' parallel arrays back to entries."""
    if not data:
        return []
    tokens = data.get("tokens") or []
    values = data.get("token_logprobs") or []
    tops = data.get("top_logprobs") or []
    offsets = data.get("text_offset") or []
    out = []
    for i, token in enumerate(tokens):
        entry = common_pb2.TokenLogprob(token=token, bytes=token.encode())
        if i < len(values) and values[i] is not None:
            entry.logprob = values[i]
        if i < len(offsets) and offsets[i] is not None:
            entry.text_offset = offsets[i]
        for alt, value in ((tops[i] if i < len(tops) else None) or {}).items():
            entry.top_logprobs.add(token=alt, logprob=value, bytes=alt.encode())
        out.append(entry)
    return out


# -- Model capabilities (a tokenwire extension of the model object) ----------------


def capabilities(c: common_pb2.EngineCapabilities) -> dict[str, dict[str, Any]]:
    """``{"completions.echo": {"upstream": false, "support": "emulated"}, ...}``."""
    return {
        name: {
            "upstream": cap.upstream,
            "support": common_pb2.ParameterSupport.Name(cap.support).removeprefix("PARAMETER_SUPPORT_").lower(),
        }
        for name, cap in sorted(c.parameters.items())
    }
