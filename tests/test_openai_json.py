"""common/openai_json.py: each OpenAI shape's two directions are inverses.

The bridge parses client JSON into protobuf (common/openai_requests.py); the
openai engine writes that protobuf back out as JSON for its upstream, and
reads the upstream's logprobs back in. A request that crosses both must reach
the upstream as the client wrote it.
"""

from __future__ import annotations

from typing import Any

from common import openai_json, openai_requests
from tokenwire.v1 import common_pb2

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        ],
        "name": "ann",
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"x": 1}'}}],
    },
    {"role": "tool", "content": "42", "tool_call_id": "call_1"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get",
            "description": "Get a thing.",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
            "strict": True,
        },
    },
    {"type": "function", "function": {"name": "bare"}},
]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "description": "d", "schema": {"type": "object"}, "strict": False},
}


def test_a_chat_request_crosses_the_bridge_and_the_engine_unchanged() -> None:
    for choice in ("auto", "none", {"type": "function", "function": {"name": "get"}}):
        body = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice, "response_format": SCHEMA}
        request = openai_requests.chat_request(body)
        assert [openai_json.message(m) for m in request.messages] == MESSAGES
        assert [openai_json.tool(t) for t in request.tools] == TOOLS
        assert openai_json.tool_choice(request.tool_choice) == choice
        assert openai_json.response_format(request.response_format) == SCHEMA
    request = openai_requests.chat_request(
        {"model": "m", "messages": MESSAGES, "response_format": {"type": "json_object"}}
    )
    assert openai_json.tool_choice(request.tool_choice) is None  # unset stays unset
    assert openai_json.response_format(request.response_format) == {"type": "json_object"}


def entries() -> list[common_pb2.TokenLogprob]:
    first = common_pb2.TokenLogprob(token="Hi", bytes=b"Hi", text_offset=0)  # an echoed first token: no logprob
    second = common_pb2.TokenLogprob(token=" there", logprob=-0.25, bytes=b" there", text_offset=2)
    second.top_logprobs.add(token=" there", logprob=-0.25, bytes=b" there")
    second.top_logprobs.add(token=" you", logprob=-1.5, bytes=b" you")
    return [first, second]


def test_logprobs_round_trip_in_both_formats() -> None:
    chat = {"content": openai_json.token_logprobs(entries())}
    back = openai_json.token_logprobs_from_json(chat)
    assert [(e.token, e.HasField("logprob"), e.logprob, e.bytes) for e in back] == [
        (e.token, e.HasField("logprob"), e.logprob, e.bytes) for e in entries()
    ]
    assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in back] == [
        [(t.token, t.logprob) for t in e.top_logprobs] for e in entries()
    ]
    legacy = openai_json.legacy_logprobs(entries())
    assert legacy["token_logprobs"] == [None, -0.25] and legacy["top_logprobs"][0] is None
    assert openai_json.legacy_logprobs(openai_json.legacy_logprobs_from_json(legacy)) == legacy


def test_capabilities_render_as_lowercase_support() -> None:
    caps = common_pb2.EngineCapabilities()
    caps.parameters["completions.echo"].support = common_pb2.PARAMETER_SUPPORT_EMULATED
    caps.parameters["seed"].upstream = True
    caps.parameters["seed"].support = common_pb2.PARAMETER_SUPPORT_NATIVE
    assert openai_json.capabilities(caps) == {
        "completions.echo": {"upstream": False, "support": "emulated"},
        "seed": {"upstream": True, "support": "native"},
    }
