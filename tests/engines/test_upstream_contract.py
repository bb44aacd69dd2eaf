"""The openai engine holds its upstream to the contract.

Against a fake upstream (a real HTTP server process, ``tests/fake_upstream.py``)
told to ignore one parameter at a time: the engine's start-up probe finds
exactly that parameter missing, and a request that sets it is either served
exactly (the engine emulates it) or refused with a 400 naming the param. It is
never forwarded and silently dropped.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import pytest

from common.errors import ApiError
from tests.engines.test_openai_upstream_engine import fronted, run, text_of
from tests.fake_upstream import DEFAULT_TOKENS, IGNORABLE
from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import Delta
from workers.engines.openai_upstream import OpenAIUpstreamEngine

PROMPT = "alpha beta gamma"  # words the fake model never writes: an echo shows


@contextmanager
def fake_upstream(*ignore: str) -> Iterator[str]:
    """The fake upstream as a process on 127.0.0.1, port 0; yields its /v1 URL."""
    argv = [sys.executable, "-m", "tests.fake_upstream", *(f"--ignore={name}" for name in ignore)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        yield f"http://{line.split()[1]}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


@asynccontextmanager
async def fake_engine(*ignore: str) -> AsyncIterator[OpenAIUpstreamEngine]:
    with fake_upstream(*ignore) as url:
        engine = OpenAIUpstreamEngine("served", url=url, upstream_model="fake", timeout=30)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()


def completion(prompt: str | list[int] = PROMPT, **fields: Any) -> worker_pb2.GenerateRequest:
    text = common_pb2.TextOrTokens(text=prompt) if isinstance(prompt, str) else common_pb2.TextOrTokens()
    if not isinstance(prompt, str):
        text.tokens.ids.extend(prompt)
    sampling = {k: fields.pop(k) for k in ("max_tokens", "seed") if k in fields}
    return worker_pb2.GenerateRequest(prompt=text, sampling=worker_pb2.SamplingParams(**sampling), **fields)


def chat(**fields: Any) -> worker_pb2.GenerateRequest:
    sampling = {k: fields.pop(k) for k in ("max_tokens", "seed") if k in fields}
    return worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content="hello there")],
        sampling=worker_pb2.SamplingParams(**sampling),
        **fields,
    )


async def refused(engine: OpenAIUpstreamEngine, request: worker_pb2.GenerateRequest) -> ApiError:
    with pytest.raises(ApiError) as info:
        await run(engine, request)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert info.value.code == "unsupported_parameter"
    return info.value


def completion_tokens(deltas: list[Delta]) -> int:
    return sum(d.token_count for d in deltas)


# -- What each ignored parameter must lead to ------------------------------------


async def all_honoured(engine: OpenAIUpstreamEngine) -> None:
    # Forwarded as is: the upstream's echo, once, with the prompt's logprobs.
    deltas = await run(engine, completion(echo=True, logprobs=True, top_logprobs=1, max_tokens=3))
    text = text_of(deltas)
    assert text.startswith(PROMPT) and text.count("alpha") == 1
    entries = [e for d in deltas for e in d.logprobs]
    assert len(entries) == 3 + 3 and not entries[0].HasField("logprob")  # 3 prompt tokens, 3 new
    assert completion_tokens(deltas) == 3  # the upstream's usage: the echo is not completion


async def echo_ignored(engine: OpenAIUpstreamEngine) -> None:
    # Emulated: the prompt text in front, exactly as an upstream echo would put it.
    for request in (completion(echo=True, max_tokens=3), completion(echo=True)):
        deltas = await run(engine, request)
        text = text_of(deltas)
        assert text.startswith(PROMPT) and text.count("alpha") == 1
        assert len(text.removeprefix(PROMPT).split()) == completion_tokens(deltas)  # the echo is not completion
    # A prompt of token ids is echoed as its text (the upstream's detokenizer).
    ids = await engine.tokenize(PROMPT, [])
    assert text_of(await run(engine, completion(ids, echo=True, max_tokens=2))).startswith(PROMPT)
    # With logprobs the prompt's logprobs are needed too, which only the upstream has.
    assert (await refused(engine, completion(echo=True, logprobs=True, top_logprobs=1, max_tokens=2))).param == "echo"
    # Without echo: as usual.
    assert "alpha" not in text_of(await run(engine, completion(max_tokens=2)))


async def logprobs_ignored(engine: OpenAIUpstreamEngine) -> None:
    assert (await refused(engine, completion(logprobs=True, top_logprobs=2, max_tokens=2))).param == "logprobs"
    assert (await refused(engine, completion(echo=True, logprobs=True, max_tokens=2))).param == "echo"
    assert text_of(await run(engine, completion(echo=True, max_tokens=2))).startswith(PROMPT)  # echo alone: fine


async def chat_logprobs_ignored(engine: OpenAIUpstreamEngine) -> None:
    assert (await refused(engine, chat(logprobs=True, max_tokens=2))).param == "logprobs"
    assert (await refused(engine, chat(logprobs=True, top_logprobs=2, max_tokens=2))).param == "logprobs"
    # Completions' logprobs are another upstream feature, still there.
    deltas = await run(engine, completion(logprobs=True, top_logprobs=2, max_tokens=2))
    assert all(len(d.logprobs) == 1 for d in deltas if d.text)


async def top_logprobs_ignored(engine: OpenAIUpstreamEngine) -> None:
    assert (await refused(engine, chat(logprobs=True, top_logprobs=2, max_tokens=2))).param == "top_logprobs"
    deltas = await run(engine, chat(logprobs=True, max_tokens=2))  # no alternatives asked: served
    assert [len(d.logprobs) for d in deltas if d.text] == [1, 1]


async def n_ignored(engine: OpenAIUpstreamEngine) -> None:
    # The gateway fans n out into n worker calls, one upstream request per
    # choice, so the upstream's n is never relied on (end to end: below).
    assert engine.capabilities is not None
    assert engine.capabilities.parameters["n"].support == common_pb2.PARAMETER_SUPPORT_EMULATED
    assert len(text_of(await run(engine, chat(max_tokens=2))).split()) == 2


async def usage_ignored(engine: OpenAIUpstreamEngine) -> None:
    # No usage chunk: counted with the upstream's tokenizer (finish "stop"),
    # or exactly max_tokens when the choice was cut there (finish "length").
    for request in (completion(), chat(), completion(max_tokens=3), chat(max_tokens=3)):
        deltas = await run(engine, request)
        words = len(text_of(deltas).split())
        assert words == (request.sampling.max_tokens or DEFAULT_TOKENS)
        assert completion_tokens(deltas) == words
    deltas = await run(engine, completion(echo=True))
    assert completion_tokens(deltas) == DEFAULT_TOKENS  # the echoed prompt is not counted


async def response_format_ignored(engine: OpenAIUpstreamEngine) -> None:
    json_mode = common_pb2.ResponseFormat(type="json_object")
    schema = common_pb2.ResponseFormat(type="json_schema")
    schema.json_schema.name = "s"
    for request in (chat(response_format=json_mode), completion(response_format=schema), chat(response_format=schema)):
        assert (await refused(engine, request)).param == "response_format"
    text = common_pb2.ResponseFormat(type="text")  # asks for nothing special
    assert text_of(await run(engine, chat(response_format=text, max_tokens=2)))


async def tools_ignored(engine: OpenAIUpstreamEngine) -> None:
    request = chat(max_tokens=4)
    request.tools.add(type="function", function=common_pb2.FunctionDefinition(name="get"))
    request.tool_choice.mode = "auto"
    assert (await refused(engine, request)).param == "tools"
    request.tool_choice.mode = "none"  # the model may not call them: nothing is lost
    assert text_of(await run(engine, request))


async def seed_ignored(engine: OpenAIUpstreamEngine) -> None:
    assert (await refused(engine, chat(seed=7, max_tokens=2))).param == "seed"
    assert (await refused(engine, completion(seed=7, max_tokens=2))).param == "seed"


async def tokenize_ignored(engine: OpenAIUpstreamEngine) -> None:
    assert engine.tokenizer is None
    with pytest.raises(ApiError) as info:
        await engine.tokenize(PROMPT, [])
    assert info.value.status == grpc.StatusCode.UNIMPLEMENTED  # no made-up ids
    prepared = await engine.prepare(completion(max_tokens=2))
    assert prepared.state is False  # an estimate, said so
    # Usage still comes from the upstream itself.
    assert completion_tokens(await run(engine, completion(max_tokens=3))) == 3


# ignored by the fake -> (capabilities the probe must find missing, what a request gets)
CASES: dict[str | None, tuple[set[str], Callable[[OpenAIUpstreamEngine], Awaitable[None]]]] = {
    None: (set(), all_honoured),
    "echo": ({"completions.echo", "completions.echo_logprobs"}, echo_ignored),
    "logprobs": ({"completions.logprobs", "completions.echo_logprobs"}, logprobs_ignored),
    "chat_logprobs": ({"chat.logprobs", "chat.top_logprobs"}, chat_logprobs_ignored),
    "top_logprobs": ({"chat.top_logprobs"}, top_logprobs_ignored),
    "n": ({"n"}, n_ignored),
    "include_usage": ({"stream_options.include_usage"}, usage_ignored),
    "response_format": (
        {
            "chat.response_format.json_object",
            "chat.response_format.json_schema",
            "completions.response_format.json_object",
            "completions.response_format.json_schema",
        },
        response_format_ignored,
    ),
    "tools": ({"tools"}, tools_ignored),
    "seed": ({"seed"}, seed_ignored),
    "tokenize": ({"tokenize"}, tokenize_ignored),
}


def test_every_ignorable_parameter_has_a_case() -> None:
    assert set(CASES) == {None, *IGNORABLE}


@pytest.mark.parametrize("ignored", list(CASES), ids=lambda name: name or "nothing")
async def test_upstream_ignoring_a_parameter(ignored: str | None) -> None:
    missing, check = CASES[ignored]
    async with fake_engine(*([ignored] if ignored else [])) as engine:
        assert engine.capabilities is not None
        assert engine.info.capabilities == engine.capabilities  # what GetModelInfo and the registry carry
        found = {name for name, cap in engine.capabilities.parameters.items() if not cap.upstream}
        assert found == missing
        for name, cap in engine.capabilities.parameters.items():
            # What the upstream honours is forwarded; what it does not never is.
            assert (cap.support == common_pb2.PARAMETER_SUPPORT_NATIVE) == cap.upstream or name == "n"
        await check(engine)


# -- Through the whole system: the SDK over a worker fronting a forgetful upstream ----


def test_sdk_over_an_upstream_ignoring_echo_and_n() -> None:
    """The done-when of issue 16: echo comes back with the prompt, or a 400 `param: echo`; never text without it."""
    import openai

    with fake_upstream("echo", "n") as url, fronted(url, "forgetful", "--upstream-model", "fake") as client:
        model = client.models.retrieve("forgetful")
        capabilities = (model.model_extra or {})["capabilities"]
        assert capabilities["completions.echo"] == {"upstream": False, "support": "emulated"}
        assert capabilities["completions.echo_logprobs"] == {"upstream": False, "support": "refused"}
        assert capabilities["n"] == {"upstream": False, "support": "emulated"}
        listed = next(m for m in client.models.list().data if m.id == "forgetful")
        assert (listed.model_extra or {})["capabilities"] == capabilities

        reply = client.completions.create(model="forgetful", prompt=PROMPT, echo=True, max_tokens=3)
        assert reply.choices[0].text.startswith(PROMPT)
        assert len(reply.choices[0].text.removeprefix(PROMPT).split()) == reply.usage.completion_tokens == 3
        chunks = list(client.completions.create(model="forgetful", prompt=PROMPT, echo=True, max_tokens=3, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices).startswith(PROMPT)
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="forgetful", prompt=PROMPT, echo=True, logprobs=2, max_tokens=3)
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == "echo" and caught.value.code == "unsupported_parameter"

        # n fans out: two choices from an upstream that answers one per request.
        reply = client.completions.create(model="forgetful", prompt=PROMPT, n=2, max_tokens=3)
        assert sorted(c.index for c in reply.choices) == [0, 1]
        assert all(len(c.text.split()) == 3 for c in reply.choices)


async def test_no_usage_and_no_tokenizer_is_said_to_be_an_estimate() -> None:
    async with fake_engine("include_usage", "tokenize") as engine:
        assert engine.capabilities is not None
        usage = engine.capabilities.parameters["stream_options.include_usage"]
        assert (usage.upstream, usage.support) == (False, common_pb2.PARAMETER_SUPPORT_ESTIMATED)
        # Still exact where it can be: a choice cut by max_tokens has that many.
        assert completion_tokens(await run(engine, completion(max_tokens=3))) == 3
        # Otherwise one token a streamed chunk (the fake streams a word a chunk).
        assert completion_tokens(await run(engine, completion())) == DEFAULT_TOKENS
