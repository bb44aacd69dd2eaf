"""The official openai SDK against the REST bridge, on echo workers."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest

from tests.conftest import API_KEY, CHAT_MODEL, ECHO_CONTEXT, EMBED_MODEL, EchoSystem


@pytest.fixture
def client(echo_system: EchoSystem) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{echo_system.url}/v1", api_key=API_KEY, max_retries=0)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {CHAT_MODEL, EMBED_MODEL} <= ids
    model = client.models.retrieve(CHAT_MODEL)
    assert model.id == CHAT_MODEL
    assert model.object == "model"
    assert model.owned_by == "tokenwire"
    assert isinstance(model.created, int) and model.created > 0


def test_chat_unary(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "alpha beta gamma"}], max_tokens=5
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "alpha beta gamma alpha beta"
    assert choice.finish_reason == "length"
    # The echo template renders "user: alpha beta gamma": 4 words.
    assert reply.usage.prompt_tokens == 4
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == 9


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "one two three"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ids = {c.id for c in chunks}
    created = {c.created for c in chunks}
    assert len(ids) == 1 and len(created) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == CHAT_MODEL for c in chunks)
    # The role delta first, then content, then the finish chunk, then usage.
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "one two three one"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_ends_with_done(echo_system: EchoSystem) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 2}
    with httpx.stream(
        "POST", f"{echo_system.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_completions_list_prompt_n2(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT_MODEL, prompt=["red green", "blue"], n=2, max_tokens=3)
    assert reply.object == "text_completion"
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    # Choices 0-1 continue the first prompt, 2-3 the second (echo starts at the choice index).
    assert reply.choices[0].text == "red green red"
    assert reply.choices[1].text == "green red green"
    assert reply.choices[2].text == "blue blue blue"
    assert reply.choices[3].text == "blue blue blue"
    assert all(c.finish_reason == "length" for c in reply.choices)
    # Each prompt counts once: 2 + 1 prompt tokens, 4 x 3 completion tokens.
    assert reply.usage.prompt_tokens == 3
    assert reply.usage.completion_tokens == 12


def test_completions_stream_and_logprobs(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=CHAT_MODEL, prompt="a b", max_tokens=2, stream=True, logprobs=2))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "a b"
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == ["a", " b"]
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("logprobs", [0, 2])
def test_completions_top_logprobs_hold_the_sampled_token(client: openai.OpenAI, logprobs: int) -> None:
    reply = client.completions.create(model=CHAT_MODEL, prompt="one two three", max_tokens=3, logprobs=logprobs)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == 3
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == value  # up to logprobs + 1 entries: the sampled token always among them
        assert 1 <= len(top) <= logprobs + 1


def test_completions_echo(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT_MODEL, prompt="x y", max_tokens=2, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == "x y x y"
    assert choice.logprobs.tokens == ["x", " y", " x", " y"]
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.text_offset[-2:] == [3, 5]
    assert reply.usage.completion_tokens == 2


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=EMBED_MODEL, input=["hello world", "bye"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens == 3
    vector = floats.data[0].embedding
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-5
    raw = client.with_raw_response.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(vector)}f", base64.b64decode(encoded))
    assert decoded == pytest.approx(vector, abs=1e-7)


def test_engines_embeddings_path(echo_system: EchoSystem) -> None:
    reply = httpx.post(
        f"{echo_system.url}/v1/engines/{EMBED_MODEL}/embeddings",
        json={"input": "hi"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert reply.status_code == 200
    assert reply.json()["model"] == EMBED_MODEL


def test_wrong_key_is_401(echo_system: EchoSystem) -> None:
    bad = openai.OpenAI(base_url=f"{echo_system.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        # What vLLM refuses too: stream_options only with stream: true, seed within int64
        # (orjson reads -2**63 - 1 as a float that rounds into range), logit_bias within the
        # vocabulary (echo's has 32000 ids) and at most 300 of them.
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1e19}, "seed"),
        ({"logit_bias": {"32000": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ],
)
def test_bad_chat_params_are_400(client: openai.OpenAI, extra: dict, param: str) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    assert caught.value.status_code == 400
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"logit_bias": {"32000": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias"),
    ],
)
def test_bad_completion_params_are_400(client: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=CHAT_MODEL, prompt="x", **extra)
    assert caught.value.status_code == 400
    assert caught.value.param == param


def test_edges_of_the_ranges_are_accepted(client: openai.OpenAI) -> None:
    for seed in (-(2**63), 2**63 - 1):
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}], seed=seed)
    bias = {str(i): -1 for i in range(31700, 32000)}  # 300 ids, the last one the vocabulary's last
    reply = client.completions.create(model=CHAT_MODEL, prompt="x", logit_bias=bias, max_tokens=2)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None


def test_malformed_json_is_400_envelope(echo_system: EchoSystem) -> None:
    for payload in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        reply = httpx.post(
            f"{echo_system.url}/v1/chat/completions",
            content=payload,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"


def test_wrong_types_are_400(echo_system: EchoSystem) -> None:
    cases = [
        ({"model": CHAT_MODEL, "messages": "hi"}, "messages"),
        ({"model": CHAT_MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "lots"}, "max_tokens"),
        ({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "stop": 7}, "stop"),
    ]
    for body, param in cases:
        reply = httpx.post(
            f"{echo_system.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert reply.status_code == 400, body
        assert reply.json()["error"]["param"] == param, reply.json()


def test_context_length_exceeded(client: openai.OpenAI) -> None:
    words = " ".join(["w"] * (ECHO_CONTEXT - 10))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": words}], max_tokens=20)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    # The same prompt with room to spare is served.
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": words}], max_tokens=5
    )
    assert reply.choices[0].finish_reason == "length"


def test_context_length_exceeded_in_stream_is_http_400(client: openai.OpenAI) -> None:
    words = " ".join(["w"] * ECHO_CONTEXT)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": words}], stream=True)
    assert caught.value.code == "context_length_exceeded"


def test_embedding_model_refuses_chat(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBED_MODEL, messages=[{"role": "user", "content": "x"}])
    assert caught.value.param == "model"


def test_token_check(echo_system: EchoSystem) -> None:
    reply = httpx.post(
        f"{echo_system.url}/api/v1/token_check",
        json={
            "prompts": [
                {"model": CHAT_MODEL, "prompt": "a b c", "max_tokens": 10},
                {"model": CHAT_MODEL, "prompt": "a", "max_tokens": 100},
            ]
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert reply.status_code == 200
    assert reply.json() == {
        "prompts": [
            {"fits": True, "tokenCount": 3, "contextLength": ECHO_CONTEXT},
            {"fits": False, "tokenCount": 1, "contextLength": ECHO_CONTEXT},
        ]
    }


def test_fastchat_chat_path(echo_system: EchoSystem) -> None:
    client = openai.OpenAI(base_url=f"{echo_system.url}/api/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "p q"}],
        max_tokens=2,
        extra_body={"repetition_penalty": 1.1},
    )
    assert reply.choices[0].message.content == "p q"


def test_unknown_route_is_enveloped(echo_system: EchoSystem) -> None:
    reply = httpx.get(f"{echo_system.url}/v1/nothing-here")
    assert reply.status_code == 404
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_chat_stream_n2(client: openai.OpenAI) -> None:
    """Two choices stream side by side: each starts with its role delta and ends
    with its own finish chunk; usage counts the prompt once."""
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "x y z"}],
            n=2,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for index, expected in ((0, "x y z"), (1, "y z x")):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == expected
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens == 4 and chunks[-1].usage.completion_tokens == 6
