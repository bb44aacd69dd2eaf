"""The sampling table (common/sampling.py): true to the proto, and what each of its readers makes of it.

Adding a sampling parameter is its proto fields plus one row; the first tests fail when either is missing.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from google.protobuf.descriptor import FieldDescriptor

from common import errors, sampling
from gateway.inference import _sampling
from gateway.validation import check_chat
from tests import harness
from tokenwire.v1 import api_pb2, common_pb2, worker_pb2
from workers.engines.openai_upstream import sampling_to_json

CHAT = api_pb2.CreateChatCompletionRequest.DESCRIPTOR
COMPLETION = api_pb2.CreateCompletionRequest.DESCRIPTOR
SAMPLING_PARAMS = worker_pb2.SamplingParams.DESCRIPTOR

_NUMBERS = (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)
_INTEGERS = (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64)


def kind_of(field: FieldDescriptor) -> str:
    """The table's kind for a proto field."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return "bias" if value.cpp_type in _NUMBERS else "map"
    if field.is_repeated:
        return "strings" if field.cpp_type == FieldDescriptor.CPPTYPE_STRING else "repeated"
    if field.cpp_type in _NUMBERS:
        return "number"
    if field.cpp_type in _INTEGERS:
        return "integer"
    return "other"


@pytest.mark.parametrize(
    ("rows", "messages"),
    [
        (sampling.SAMPLING, (CHAT, COMPLETION)),
        (sampling.CHAT_ONLY, (CHAT,)),
        (sampling.COMPLETION_ONLY, (COMPLETION,)),
    ],
)
def test_every_row_is_a_field_of_its_requests_with_its_kind(rows, messages) -> None:  # type: ignore[no-untyped-def]
    for message in messages:
        for row in rows:
            field = message.fields_by_name.get(row.name)
            assert field is not None, f"{message.name} has no field {row.name}"
            assert kind_of(field) == row.kind, (message.name, row.name)
            if row.kind in ("number", "integer"):
                assert field.has_presence, f"{message.name}.{row.name} must be optional: unset is not 0"


def test_every_sampling_params_field_has_a_row_of_its_kind() -> None:
    rows = {row.name: row for row in sampling.SAMPLING}
    for field in SAMPLING_PARAMS.fields:
        assert field.name in rows, f"SamplingParams.{field.name} has no row in common/sampling.py"
        assert kind_of(field) == rows[field.name].kind, field.name
    # n stays in the gateway: one worker call per choice.
    assert set(rows) - set(SAMPLING_PARAMS.fields_by_name) == {"n"}


def full_chat() -> api_pb2.CreateChatCompletionRequest:
    return api_pb2.CreateChatCompletionRequest(
        model="m",
        messages=[common_pb2.ChatMessage(role="user", content="hi")],
        temperature=0.5,
        top_p=0.9,
        n=3,
        max_tokens=7,
        presence_penalty=0.25,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        top_k=40,
        min_p=0.05,
        stop=["a", "b"],
        logit_bias={42: -100.0, 7: 5.0},
        seed=11,
    )


def test_the_gateway_copies_every_set_field_but_n_into_sampling_params() -> None:
    request = full_chat()
    params = _sampling(request)
    for field in SAMPLING_PARAMS.fields:
        assert getattr(params, field.name) == getattr(request, field.name), field.name
    unset = _sampling(api_pb2.CreateChatCompletionRequest(model="m"))
    assert not any(unset.HasField(f.name) for f in SAMPLING_PARAMS.fields if kind_of(f) in ("number", "integer"))


def test_the_openai_engine_sends_what_is_set_by_openai_names() -> None:
    body = sampling_to_json(_sampling(full_chat()))
    assert body == {
        "temperature": 0.5,
        "top_p": 0.9,
        "presence_penalty": 0.25,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "repeat_penalty": 1.1,  # llama.cpp's server's name for it
        "top_k": 40,
        "min_p": 0.05,
        "stop": ["a", "b"],
        "logit_bias": {"42": -100.0, "7": 5.0},
        "seed": 11,
    }
    assert sampling_to_json(worker_pb2.SamplingParams()) == {}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 2.5, "2.5 is out of range for 'temperature': it must be between 0 and 2."),
        ("n", 0, "0 is less than the minimum of 1 - 'n'"),
        ("n", 9, "9 is greater than the maximum of 8 - 'n'"),
        ("repetition_penalty", 0.0, "repetition_penalty must be greater than 0."),
        ("top_k", -2, "-2 is less than the minimum of -1 - 'top_k'"),
        ("top_logprobs", 21, "21 is out of range for 'top_logprobs': it must be between 0 and 20."),
    ],
)
def test_the_gateway_names_the_bound_and_the_param(field: str, value: float, message: str) -> None:
    request = full_chat()
    request.logprobs = True
    setattr(request, field, value)
    with pytest.raises(errors.ApiError) as raised:
        check_chat(request, sampling.Limits(max_n=8))
    assert (raised.value.message, raised.value.param) == (message, field)


def test_openapi_and_the_gateway_follow_serves_max_n() -> None:
    """`tokenwire serve --max-n 7`: the bridge's /openapi.json says 7, and the gateway refuses 8."""
    serve = harness.Serve(["--echo", "--no-embeddings", "--max-n", "7", "--max-tokens-limit", "300"]).start()
    try:
        document = httpx.get(f"{serve.url}/openapi.json", timeout=10).json()
        for path in ("/v1/chat/completions", "/v1/completions"):
            schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert schema["properties"]["n"]["maximum"] == 7, path
            assert schema["properties"]["max_tokens"]["maximum"] == 300, path
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(model="echo-chat", messages=messages, n=7)  # type: ignore[arg-type]
        assert len(reply.choices) == 7
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="echo-chat", messages=messages, n=8)  # type: ignore[arg-type]
        assert raised.value.body["param"] == "n"  # type: ignore[index]
    finally:
        assert serve.stop() == 0
