"""The embedded default, end to end: `tokenwire serve` (what `make serve`
runs) with SmolLM2-135M-Instruct on llama.cpp and all-MiniLM-L6-v2, driven by
the official openai SDK.

Reliability of prompts: this Q4_1 135M model is weak at greedy decoding on
open questions ("What is the capital of France?" at temperature 0 gives
nonsense), but "... Answer in one sentence." at temperature 0 answers "The
capital of France is Paris." every time, and counting "1, 2, 3, 4," continues
the sequence. Every generation here is greedy or seeded, so results repeat.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator

import grpc
import jsonschema
import openai
import pytest

from tests import harness
from tokenwire.v1 import registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.models

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def served() -> Iterator[harness.Serve]:
    serve = harness.Serve(["--log-level", "warning"]).start()
    yield serve
    assert serve.stop() == 0


@pytest.fixture(scope="module")
def client(served: harness.Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=120)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_models_listed(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} == {CHAT, EMBED}


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=FRANCE, temperature=0, max_tokens=30)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 10  # the template's system prompt is counted too
    assert reply.usage.completion_tokens <= 30


def test_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=CHAT,
            messages=FRANCE,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id}


def test_stop_strings(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT, prompt="1, 2, 3, 4,", temperature=0, max_tokens=20, stop=[" 7"])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert " 7" not in choice.text
    assert "5" in choice.text


def test_max_tokens_is_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=FRANCE, temperature=0, max_completion_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_seed_repeats(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        messages = [{"role": "user", "content": "Write a short poem about the sea."}]
        reply = client.chat.completions.create(model=CHAT, messages=messages, temperature=1.0, seed=seed, max_tokens=16)
        return reply.choices[0].message.content

    first = run(1234)
    assert run(1234) == first
    assert run(99) != first


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT, messages=FRANCE, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)
    assert "".join(e.token for e in entries) == reply.choices[0].message.content


def test_completion_echo_and_logprobs(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=CHAT, prompt=prompt, temperature=0, max_tokens=4, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert reply.usage.completion_tokens == 4


def test_completion_logprobs_0_gives_the_sampled_token(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT, prompt="1, 2, 3,", temperature=0, max_tokens=4, logprobs=0)
    logprobs = reply.choices[0].logprobs
    assert logprobs.top_logprobs == [{t: v} for t, v in zip(logprobs.tokens, logprobs.token_logprobs, strict=True)]


def test_json_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[
            {"role": "user", "content": "Describe the city of Paris as a JSON object with a name and a country."}
        ],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "What is the capital of France? Reply in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
        temperature=0,
        max_tokens=100,
    )
    data = json.loads(reply.choices[0].message.content)
    jsonschema.validate(data, schema)


def test_context_length_exceeded_by_the_real_tokenizer(client: openai.OpenAI) -> None:
    context = client.models.retrieve(CHAT).model_extra["context_length"]
    words = "hello " * context  # one token each, plus the template
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": words}], max_tokens=1)
    assert caught.value.code == "context_length_exceeded"


def test_embeddings_similarity_and_base64(client: openai.OpenAI) -> None:
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue grew by 4 percent."]
    reply = client.embeddings.create(model=EMBED, input=texts)
    cat, kitten, revenue = (d.embedding for d in reply.data)
    assert len(cat) == 384
    assert cosine(cat, kitten) > cosine(cat, revenue)
    assert reply.usage.prompt_tokens > len(texts)
    raw = client.with_raw_response.embeddings.create(model=EMBED, input=texts[0], encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    assert struct.unpack("<384f", base64.b64decode(encoded)) == pytest.approx(cat, abs=1e-6)


def test_zero_config_serve_is_a_closed_cluster(served: harness.Serve) -> None:
    """`tokenwire serve` with no settings: its parts share a token nobody else
    has, that no command line and no log line shows."""
    token = served.token
    assert token and not [line for line in harness.cmdlines().values() if token in line]
    # Every part's command line was looked at: the front end (gateway and bridge) and two workers.
    assert served.process is not None and len(harness.children(served.process.pid)) == 3
    with grpc.insecure_channel(served.registry_address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListWorkers(registry_pb2.ListWorkersRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        members = stub.ListWorkers(
            registry_pb2.ListWorkersRequest(), timeout=5, metadata=harness.cluster_metadata(token)
        )
    assert {w.model.name for w in members.workers} == {CHAT, EMBED}
    assert token not in served.log()


def worker_address(served: harness.Serve, model: str) -> str:
    with grpc.insecure_channel(served.registry_address) as channel:
        workers = registry_pb2_grpc.RegistryServiceStub(channel).ListWorkers(
            registry_pb2.ListWorkersRequest(model=model), metadata=harness.cluster_metadata(served.token)
        )
    return workers.workers[0].address


def test_cancelled_stream_stops_llama(client: openai.OpenAI, served: harness.Serve) -> None:
    address = worker_address(served, CHAT)
    before = harness.worker_stats(address, served.token)
    stream = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=400,
        temperature=0.7,
        seed=1,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()  # the HTTP connection goes away mid-stream
    after = harness.wait_until(
        lambda: (
            (s := harness.worker_stats(address, served.token)).cancelled_total == before.cancelled_total + 1
            and s.in_flight == 0
            and s
        ),
        timeout=30,
    )
    # This call's own figure (the worker's maximum spans every test's calls).
    assert after.tokens_after_cancel_total - before.tokens_after_cancel_total <= 1
    # The sequence left the batch and its KV cells are free: counted, not timed
    # (a wall-clock bound here failed on a loaded machine, and with batching a
    # next request would not wait for the story anyway).
    assert after.running_sequences == 0 and after.kv_cells_in_use == 0
    steps = after.decode_steps
    reply = client.chat.completions.create(model=CHAT, messages=FRANCE, temperature=0, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    # The next request's own steps only (its prompt in chunks, then 2 tokens): nothing of the story's ~395 more.
    assert harness.worker_stats(address, served.token).decode_steps - steps <= 8


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def streamed_call(client: openai.OpenAI, request: dict[str, object]) -> tuple[str, list[str], str, str, str]:
    """A streamed choice with a tool call: its content, finish reasons, and the call's name, arguments and id."""
    chunks = list(client.chat.completions.create(**request, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return content, finish, calls[0].function.name, "".join(t.function.arguments or "" for t in calls), calls[0].id


def forced_weather_call(max_tokens: int) -> dict[str, object]:
    return {
        "model": CHAT,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "max_tokens": max_tokens,
    }


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call(client: openai.OpenAI, stream: bool) -> None:
    """tool_choice naming a function: the arguments follow its schema (grammar)."""
    request = forced_weather_call(60)
    if stream:
        _, finish, name, arguments, call_id = streamed_call(client, request)
        assert call_id and finish == ["tool_calls"]
    else:
        choice = client.chat.completions.create(**request).choices[0]
        assert choice.finish_reason == "tool_calls"
        name, arguments = choice.message.tool_calls[0].function.name, choice.message.tool_calls[0].function.arguments
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])


# -- compact grammars: structured output within small budgets ----------------
#
# The grammars allow no whitespace outside strings, so what a budget must hold
# is the JSON itself. Where a test bounds the strings (maxLength), the budget
# covers the longest answer the grammar allows in this model's usual
# tokenization (about one token per word piece, not one per character).

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "maximum": 150}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize(
    "prompt",
    [
        "Give me a JSON object with a key name and a key age.",
        "Give me a JSON object describing Paris with keys city and country.",
    ],
)
def test_json_object_fits_a_small_budget(client: openai.OpenAI, prompt: str) -> None:
    # Greedy JSON mode on these prompts writes flat objects of a few short
    # values: the model's choice, which the stock grammar let it pad with
    # newlines and indentation until 60 tokens ran out.
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": prompt}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)
    assert not any(c in choice.message.content for c in "\n\t")


def test_json_schema_fits_the_budget_its_grammar_allows(client: openai.OpenAI) -> None:
    # {"name":"<=16 chars","age":<=3 digits}: at most about 30 tokens.
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Invent a person and give their name and age as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        temperature=0,
        max_tokens=32,
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def short_tool(name: str, arg: str) -> dict[str, object]:
    schema = {"type": "object", "properties": {arg: {"type": "string", "maxLength": 12}}, "required": [arg]}
    return {"type": "function", "function": {"name": name, "parameters": schema}}


TWO_TOOLS = [short_tool("get_weather", "city"), short_tool("get_time", "timezone")]


def test_required_choice_of_two_tools_within_32_tokens(client: openai.OpenAI) -> None:
    # {"name":"get_weather","arguments":{"city":"<=12 chars"}}: about 20 tokens.
    # Which tool the model picks is its choice; either must be a valid call.
    choice = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=TWO_TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=32,
    ).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    tool = next(t for t in TWO_TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_cut_by_max_tokens(client: openai.OpenAI, stream: bool) -> None:
    """Cut short: finish_reason "length", the partial call in tool_calls, nothing in content."""
    request = forced_weather_call(3)  # {"city":"Paris"} takes more than three tokens
    if stream:
        content, finish, name, arguments, _ = streamed_call(client, request)
        assert finish == ["length"]
    else:
        choice = client.chat.completions.create(**request).choices[0]
        assert choice.finish_reason == "length"
        content = choice.message.content
        (call,) = choice.message.tool_calls
        name, arguments = call.function.name, call.function.arguments
    assert not content
    assert name == "get_weather"
    assert arguments.startswith("{")
    with pytest.raises(ValueError):
        json.loads(arguments)  # partial, as OpenAI returns it


# -- strings in grammars are JSON strings; $ref/$defs under every tool_choice ----
#
# A model that writes code or verse wants a raw newline inside a string, which
# json.loads refuses ("Invalid control character"). Every grammar's strings
# allow only what JSON does. The budgets cover what the grammars allow: the
# strings are bounded (maxLength), so each call ends within max_tokens.

PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "maxLength": 80}},
            "required": ["code"],
        },
    },
}


def item_tool(name: str, prop: str, item: dict[str, object]) -> dict[str, object]:
    """A tool whose parameters refer to their own ``#/$defs/Item``, as pydantic writes them."""
    parameters = {
        "type": "object",
        "properties": {prop: {"$ref": "#/$defs/Item"}},
        "required": [prop],
        "$defs": {"Item": item},
    }
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


LINES = {"type": "string", "maxLength": 80}
# Two tools, each with a $defs/Item of its own: the names clash once both are under one anyOf.
NOTE_TOOL = item_tool(
    "save_note",
    "note",
    {"type": "object", "properties": {"title": LINES, "body": LINES}, "required": ["title", "body"]},
)
CODE_TOOL = item_tool(
    "save_code",
    "snippet",
    {"type": "object", "properties": {"language": {"enum": ["python", "c"]}, "code": LINES}, "required": ["code"]},
)


# With the converter's own string rule, greedy SmolLM2 answered both with a raw newline inside
# the string ("...print(i)}\n\nThis is...", "...):\n    def __init__..."): not JSON.
@pytest.mark.parametrize(
    "prompt",
    ["Write a Python for loop that prints 1 to 3, on two lines.", "Define a Python class Dog with a method bark."],
)
def test_forced_code_call_is_json(client: openai.OpenAI, prompt: str) -> None:
    # A grammar step checks the whole vocabulary: on a loaded machine 100 of them can take minutes.
    choice = (
        client.with_options(timeout=600)
        .chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": prompt}],
            tools=[PYTHON_TOOL],
            tool_choice={"type": "function", "function": {"name": "python"}},
            temperature=0,
            max_tokens=100,  # {"code":"<=80 characters"}: at most one token a character, and the rest
        )
        .choices[0]
    )
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "python"
    jsonschema.validate(json.loads(call.function.arguments), PYTHON_TOOL["function"]["parameters"])


@pytest.mark.parametrize(
    "prompt",
    ["Write a Python function that adds two numbers.", "Save a note with a short poem about the sea, a verse a line."],
)
def test_required_choice_of_tools_with_clashing_defs(client: openai.OpenAI, prompt: str) -> None:
    tools = [NOTE_TOOL, CODE_TOOL]
    choice = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": prompt}],
        tools=tools,
        tool_choice="required",
        temperature=0,
        max_tokens=220,  # two strings of <= 80 characters and the call around them
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    tool = next(t for t in tools if t["function"]["name"] == call.function.name)
    # jsonschema resolves the tool's own #/$defs/Item: the arguments follow that tool's Item.
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_json_schema_with_defs_and_multi_line_text(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"poems": {"type": "array", "items": {"$ref": "#/$defs/Poem"}, "minItems": 1, "maxItems": 2}},
        "required": ["poems"],
        "$defs": {
            "Poem": {"type": "object", "properties": {"title": LINES, "text": LINES}, "required": ["title", "text"]}
        },
    }
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Write a short poem about the sea, with its verses on separate lines."}],
        response_format={"type": "json_schema", "json_schema": {"name": "poems", "schema": schema}},
        temperature=0,
        max_tokens=400,  # two poems of two strings of <= 80 characters
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_json_schema_pattern_with_a_negated_class(client: openai.OpenAI) -> None:
    # "[^,]" alone would take quotes, backslashes and newlines; in a JSON string it may not.
    schema = {
        "type": "object",
        "properties": {"quote": {"type": "string", "pattern": "^[^,]{1,60}$"}},
        "required": ["quote"],
    }
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": 'Quote a famous line of dialogue, in "double quotes", then a new line.'}],
        response_format={"type": "json_schema", "json_schema": {"name": "quote", "schema": schema}},
        temperature=0,
        max_tokens=80,  # {"quote":"<=60 characters"}
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        # A cycle of references that never reaches a value.
        ({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"anyOf": [{"$ref": "#/$defs/A"}]}}}, "A"),
        ({"type": "object", "properties": {"x": {"$ref": "https://example.com/item.json"}}}, "example.com"),
        ({"type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}}, "Missing"),
    ],
)
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "second"}}])
def test_unusable_references_are_400_naming_them(
    client: openai.OpenAI, parameters: dict[str, object], named: str, tool_choice: object
) -> None:
    tools = [
        {"type": "function", "function": {"name": "first", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "second", "parameters": parameters}},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Hi"}], tools=tools, tool_choice=tool_choice, max_tokens=8
        )
    error = caught.value.body
    assert named in error["message"] and "$ref" in error["message"]
    assert error["param"] == "tools[1].function.parameters"


@pytest.mark.parametrize("token", [49152, 99999999])
def test_logit_bias_outside_the_vocabulary_is_400(client: openai.OpenAI, token: int) -> None:
    # SmolLM2's vocabulary: 49,152 ids, 0..49151.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=FRANCE, logit_bias={str(token): -100}, max_tokens=2)
    assert caught.value.param == "logit_bias"
    assert str(token) in caught.value.message
