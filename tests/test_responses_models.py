"""The Responses API and tokenize/detokenize on the embedded default models
(`tokenwire serve`: SmolLM2-135M-Instruct on llama.cpp, all-MiniLM-L6-v2),
driven by the official openai SDK.

The 135M model is weak, so these assert properties: structure that the grammar
guarantees (json_schema formats, forced tool calls), prompt token counts that
show what the model was given (compared with /tokenize of the same messages),
and "Paris" for the one question it answers reliably (see test_models.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from tests import harness

pytestmark = pytest.mark.models

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
FRANCE = "What is the capital of France? Answer in one sentence."
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def served() -> Iterator[harness.Serve]:
    serve = harness.Serve(["--log-level", "warning"]).start()
    yield serve
    assert serve.stop() == 0


@pytest.fixture(scope="module")
def client(served: harness.Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=120)


def tokenize(served: harness.Serve, **body: object) -> dict:
    reply = httpx.post(f"{served.url}/tokenize", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def test_string_input(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=CHAT, input=FRANCE, temperature=0, max_output_tokens=30)
    assert reply.status == "completed" and reply.incomplete_details is None
    assert [item.type for item in reply.output] == ["message"]
    assert reply.output[0].content[0].type == "output_text"
    assert "Paris" in reply.output_text
    usage = reply.usage
    assert usage.input_tokens > 10 and 0 < usage.output_tokens <= 30
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_message_list_with_instructions(client: openai.OpenAI, served: harness.Serve) -> None:
    """Instructions become the system message the template renders first."""
    instructions = "You are a geography teacher."
    reply = client.responses.create(
        model=CHAT,
        instructions=instructions,
        input=[{"role": "user", "content": [{"type": "input_text", "text": FRANCE}]}],
        temperature=0,
        max_output_tokens=30,
    )
    assert reply.status == "completed" and reply.output_text.strip()
    assert reply.instructions == instructions
    sent = [{"role": "system", "content": instructions}, {"role": "user", "content": FRANCE}]
    assert reply.usage.input_tokens == tokenize(served, model=CHAT, messages=sent)["count"]


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = client.responses.create(
        model=CHAT,
        input="What is the capital of France? Reply in JSON.",
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema}},
        temperature=0,
        max_output_tokens=100,
    )
    assert reply.status == "completed"
    jsonschema.validate(json.loads(reply.output_text), schema)
    assert reply.text.format.type == "json_schema"


def test_required_function_tool_then_its_output(client: openai.OpenAI, served: harness.Serve) -> None:
    """tool_choice=required: a function_call item whose arguments follow the
    schema; then its output goes back (as a stored conversation, and as
    explicit items) and the model answers in text."""
    first = client.responses.create(
        model=CHAT,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    assert calls[0].call_id and calls[0].id
    output = {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature_c": 21}'}

    follow = client.responses.create(
        model=CHAT, previous_response_id=first.id, input=[output], tools=[WEATHER], temperature=0, max_output_tokens=40
    )
    assert follow.status in ("completed", "incomplete") and follow.output[0].type == "message"
    assert follow.output_text.strip()
    # Without the store: the same turn as explicit items gives the same prompt.
    call_item = {
        "type": "function_call",
        "call_id": calls[0].call_id,
        "name": "get_weather",
        "arguments": calls[0].arguments,
    }
    explicit = client.responses.create(
        model=CHAT,
        input=[{"role": "user", "content": "What is the weather in Paris?"}, call_item, output],
        tools=[WEATHER],
        temperature=0,
        max_output_tokens=40,
        store=False,
    )
    assert explicit.usage.input_tokens == follow.usage.input_tokens and explicit.output_text.strip()


def test_stream_events_add_up(client: openai.OpenAI) -> None:
    with client.responses.stream(model=CHAT, input=FRANCE, temperature=0, max_output_tokens=30) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[:4] == head and kinds[-4:] == [*tail, "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == final.output_text and "Paris" in final.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == final.output_text
    assert final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_stream_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=CHAT,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=60,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2:6] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    jsonschema.validate(json.loads(arguments), WEATHER["parameters"])
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert call.arguments == arguments and call.name == "get_weather"


def test_previous_response_id_continues(client: openai.OpenAI, served: harness.Serve) -> None:
    first = client.responses.create(model=CHAT, input="My name is Alice.", temperature=0, max_output_tokens=20)
    second = client.responses.create(
        model=CHAT, input="What is my name?", previous_response_id=first.id, temperature=0, max_output_tokens=20
    )
    assert second.previous_response_id == first.id and second.output_text.strip()
    conversation = [
        {"role": "user", "content": "My name is Alice."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.usage.input_tokens == tokenize(served, model=CHAT, messages=conversation)["count"]


def test_incomplete_at_max_output_tokens(client: openai.OpenAI) -> None:
    reply = client.responses.create(
        model=CHAT, input="Count from 1 to 100: 1, 2, 3,", temperature=0, max_output_tokens=5
    )
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 5 and reply.output[0].status == "incomplete"
    events = list(
        # Greedy, as above: sampled, the model may end its answer within 5 tokens.
        client.responses.create(
            model=CHAT, input="Count from 1 to 100: 1, 2, 3,", temperature=0, max_output_tokens=5, stream=True
        )
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("model", [CHAT, EMBED])
def test_tokenize_detokenize_round_trip(served: harness.Serve, model: str) -> None:
    text = "Hello world, this is tokenwire."
    plain = tokenize(served, model=model, prompt=text, add_special_tokens=False)
    assert plain["count"] == len(plain["tokens"]) > 3 and plain["max_model_len"] > 0
    back = httpx.post(f"{served.url}/detokenize", json={"model": model, "tokens": plain["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.json()["prompt"].lower() == text.lower()  # MiniLM lower-cases
    special = tokenize(served, model=model, prompt=text)
    if model == EMBED:  # [CLS] ... [SEP] around the same ids
        assert special["tokens"][1:-1] == plain["tokens"] and special["count"] == plain["count"] + 2
    bad = httpx.post(f"{served.url}/detokenize", json={"model": model, "tokens": [10**9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_tokenize_messages_is_the_prompt_the_model_sees(client: openai.OpenAI, served: harness.Serve) -> None:
    messages = [{"role": "user", "content": FRANCE}]
    counted = tokenize(served, model=CHAT, messages=messages)
    reply = client.chat.completions.create(model=CHAT, messages=messages, temperature=0, max_tokens=1)
    assert counted["count"] == reply.usage.prompt_tokens
    rendered = httpx.post(f"{served.url}/detokenize", json={"model": CHAT, "tokens": counted["tokens"]}, timeout=30)
    assert FRANCE in rendered.json()["prompt"] and "<|im_start|>" in rendered.json()["prompt"]
