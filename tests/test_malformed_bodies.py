"""Structurally wrong bodies get a 400 naming the parameter, never a 5xx.

The schemathesis test draws bodies from the bridge's own OpenAPI document;
this one starts from rich valid bodies and puts a value of the wrong JSON
type at every depth (an array where an object belongs, an object where a
string belongs, ...), which that document's schemas do not generate.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEY, CHAT_MODEL, EMBED_MODEL, EchoSystem

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": CHAT_MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."},
        ],
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        "logit_bias": {"42": -1},
        "stop": ["\n\n", "END"],
        "max_tokens": 4,
        "temperature": 0.5,
        "top_p": 0.9,
        "n": 1,
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": False,
        "stream_options": None,  # only with stream: true
        "user": "u",
    },
    "/v1/completions": {
        "model": CHAT_MODEL,
        "prompt": ["Once upon", "a time"],
        "max_tokens": 4,
        "stop": "END",
        "echo": True,
        "logprobs": 2,
        "logit_bias": {"1": 2.0},
        "temperature": 0,
        "suffix": None,
    },
    "/v1/embeddings": {"model": EMBED_MODEL, "input": ["a", "b"], "encoding_format": "float", "dimensions": 8},
    "/api/v1/token_check": {"prompts": [{"model": CHAT_MODEL, "prompt": "Hello there", "max_tokens": 4}]},
    "/v1/responses": {
        "model": CHAT_MODEL,
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny."},
            {"type": "message", "role": "assistant", "content": "It is sunny."},
        ],
        "tools": [{"type": "function", **TOOL["function"]}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        "max_output_tokens": 4,
        "temperature": 0.5,
        "top_p": 0.9,
        "metadata": {"k": "v"},
        "parallel_tool_calls": True,
        "store": False,
        "stream": False,
        "user": "u",
    },
    "/tokenize": {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "add_special_tokens": True,
    },
    "/detokenize": {"model": CHAT_MODEL, "tokens": [1, 2, 3]},
}
WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.lists(
        st.one_of(st.none(), st.integers(), st.text(max_size=3), st.dictionaries(st.text(max_size=3), st.integers())),
        max_size=3,
    ),
    st.dictionaries(
        st.text(max_size=5),
        st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers())),
        max_size=3,
    ),
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value: object keys and array indices, at every depth."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths(item, (*prefix, i))
    return found


def replaced(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return body


# One value of each JSON type.
REPRESENTATIVES = [None, True, 3, 2.5, "x", [None, None], {"a": 1}]


def check_refusal(reply: httpx.Response, what: str) -> None:
    assert reply.status_code < 500, f"{what} -> {reply.status_code} {reply.text[:300]}"
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, reply.text
        assert error["message"]


@pytest.fixture
def client(echo_system: EchoSystem) -> Any:
    with httpx.Client(base_url=echo_system.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        yield client


@pytest.mark.parametrize("endpoint", list(BODIES))
def test_every_type_at_every_place(client: httpx.Client, endpoint: str) -> None:
    base = BODIES[endpoint]
    assert client.post(endpoint, json=base).status_code == 200, "the base body must be valid"
    statuses = set()
    for place in paths(base):
        for value in REPRESENTATIVES:
            reply = client.post(endpoint, json=replaced(base, place, value))
            check_refusal(reply, f"{place} = {value!r}")
            statuses.add(reply.status_code)
    assert 400 in statuses, statuses


@pytest.mark.parametrize("endpoint", list(BODIES))
def test_random_wrong_values_at_every_depth(client: httpx.Client, endpoint: str) -> None:
    base = BODIES[endpoint]

    @given(place=st.sampled_from(paths(base)), value=WRONG)
    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(place: tuple[Any, ...], value: Any) -> None:
        check_refusal(client.post(endpoint, json=replaced(base, place, value)), f"{place} = {value!r}")

    run()


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (
            {"tools": [{**TOOL, "function": {**TOOL["function"], "parameters": [None, None]}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": ["get_weather"]}}]}, "tools[0].function.name"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
            "response_format.json_schema.schema",
        ),
        ({"tool_choice": {"type": "function", "function": {"name": 3}}, "tools": [TOOL]}, "tool_choice.function.name"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
    ],
)
def test_the_sdk_is_told_which_param_is_wrong(echo_system: EchoSystem, change: dict[str, Any], param: str) -> None:
    client = openai.OpenAI(base_url=f"{echo_system.url}/v1", api_key=API_KEY, max_retries=0)
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], **change}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"
    assert param in info.value.message
