"""The same operations through the generated stubs, plus reflection and health."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import harness
from tests.conftest import API_KEY, CHAT_MODEL, ECHO_CONTEXT, EMBED_MODEL, EchoSystem
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

AUTH = (("authorization", f"Bearer {API_KEY}"),)


def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    return found


@pytest.fixture
async def stub(echo_system: EchoSystem) -> AsyncIterator[api_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(echo_system.grpc_address) as channel:
        yield api_pb2_grpc.InferenceServiceStub(channel)


def reason(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role="user", content=text)


async def test_models(stub: api_pb2_grpc.InferenceServiceStub) -> None:
    reply = await stub.ListModels(api_pb2.ListModelsRequest(), metadata=AUTH)
    by_id = {m.id: m for m in reply.data}
    assert by_id[CHAT_MODEL].kind == common_pb2.MODEL_KIND_CHAT
    assert by_id[CHAT_MODEL].context_length == ECHO_CONTEXT
    assert by_id[CHAT_MODEL].workers == 2
    assert by_id[EMBED_MODEL].kind == common_pb2.MODEL_KIND_EMBEDDING
    one = await stub.GetModel(api_pb2.GetModelRequest(model=CHAT_MODEL), metadata=AUTH)
    assert one.model.id == CHAT_MODEL


async def test_chat_unary_and_stream(stub: api_pb2_grpc.InferenceServiceStub) -> None:
    request = api_pb2.CreateChatCompletionRequest(model=CHAT_MODEL, messages=[user("a b c")], max_tokens=3)
    reply = await stub.CreateChatCompletion(request, metadata=AUTH)
    assert reply.choices[0].message.content == "a b c"
    assert reply.usage.completion_tokens == 3
    chunks = [
        c
        async for c in stub.StreamChatCompletion(
            api_pb2.StreamChatCompletionRequest(
                request=request, stream_options=api_pb2.StreamOptions(include_usage=True)
            ),
            metadata=AUTH,
        )
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "a b c"
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


async def test_completion_and_embedding(stub: api_pb2_grpc.InferenceServiceStub) -> None:
    prompts = [common_pb2.TextOrTokens(text="x y"), common_pb2.TextOrTokens(tokens=common_pb2.TokenIds(ids=[5, 6, 7]))]
    reply = await stub.CreateCompletion(
        api_pb2.CreateCompletionRequest(model=CHAT_MODEL, prompt=prompts, n=2, max_tokens=2), metadata=AUTH
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.prompt_tokens == 5
    embedded = await stub.CreateEmbedding(
        api_pb2.CreateEmbeddingRequest(model=EMBED_MODEL, input=[common_pb2.TextOrTokens(text="hi")]), metadata=AUTH
    )
    assert len(embedded.data) == 1 and len(embedded.data[0].embedding) == 16


async def test_tokens(stub: api_pb2_grpc.InferenceServiceStub) -> None:
    counted = await stub.CountTokens(
        api_pb2.CountTokensRequest(model=CHAT_MODEL, prompt="one two three"), metadata=AUTH
    )
    assert counted.count == 3 and counted.context_length == ECHO_CONTEXT
    checked = await stub.CheckTokens(
        api_pb2.CheckTokensRequest(
            prompts=[api_pb2.TokenCheckPrompt(model=CHAT_MODEL, prompt="a b", max_tokens=ECHO_CONTEXT)]
        ),
        metadata=AUTH,
    )
    assert not checked.prompts[0].fits and checked.prompts[0].token_count == 2


@pytest.mark.parametrize(
    ("call", "code", "why"),
    [
        ("no_key", grpc.StatusCode.UNAUTHENTICATED, "invalid_api_key"),
        ("unknown_model", grpc.StatusCode.NOT_FOUND, "model_not_found"),
        ("too_long", grpc.StatusCode.INVALID_ARGUMENT, "context_length_exceeded"),
        ("bad_temperature", grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    ],
)
async def test_errors_carry_status_and_reason(
    stub: api_pb2_grpc.InferenceServiceStub, call: str, code: grpc.StatusCode, why: str
) -> None:
    request = api_pb2.CreateChatCompletionRequest(model=CHAT_MODEL, messages=[user("x")])
    metadata = AUTH
    if call == "no_key":
        metadata = (("authorization", "Bearer nope"),)
    elif call == "unknown_model":
        request.model = "nope"
    elif call == "too_long":
        request.messages[0].content = " ".join(["w"] * ECHO_CONTEXT)
    else:
        request.temperature = 5
    for streaming in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if streaming:
                async for _ in stub.StreamChatCompletion(
                    api_pb2.StreamChatCompletionRequest(request=request), metadata=metadata
                ):
                    pass
            else:
                await stub.CreateChatCompletion(request, metadata=metadata)
        assert caught.value.code() == code
        assert reason(caught.value) == why


async def test_health_serving(echo_system: EchoSystem) -> None:
    async with grpc.aio.insecure_channel(echo_system.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tokenwire.v1.InferenceService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_reflection_and_calls(echo_system: EchoSystem) -> None:
    """What an operator types: list, describe, a unary call, a stream, health."""
    address = echo_system.grpc_address

    def run(*args: str) -> str:
        done = subprocess.run([grpcurl(), "-plaintext", *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    services = run(address, "list").split()
    assert {"tokenwire.v1.InferenceService", "tokenwire.v1.RegistryService", "grpc.health.v1.Health"} <= set(services)
    assert "CreateChatCompletion" in run(address, "describe", "tokenwire.v1.InferenceService")
    body = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2})
    reply = json.loads(
        run(
            "-H",
            f"authorization: Bearer {API_KEY}",
            "-d",
            body,
            address,
            "tokenwire.v1.InferenceService/CreateChatCompletion",
        )
    )
    assert reply["choices"][0]["message"]["content"] == "hi there"
    stream = run(
        "-H", f"authorization: Bearer {API_KEY}",
        "-d", json.dumps({"request": json.loads(body)}),
        address, "tokenwire.v1.InferenceService/StreamChatCompletion",
    )  # fmt: skip
    chunks, decoder, rest = [], json.JSONDecoder(), stream.strip()
    while rest:
        chunk, end = decoder.raw_decode(rest)
        chunks.append(chunk)
        rest = rest[end:].strip()
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    assert text == "hi there"
    last = chunks[-1]["choices"][0]
    assert last.get("finish_reason", last.get("finishReason")) == "length"
    assert json.loads(run("-d", "{}", address, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}


async def test_fast_engine_deltas_are_grouped(echo_system: EchoSystem) -> None:
    """An engine faster than the wire (echo without delay) costs fewer messages
    than tokens, and nothing is lost in the grouping."""
    from tokenwire.v1 import worker_pb2, worker_pb2_grpc

    async with grpc.aio.insecure_channel(echo_system.chat_workers[0].address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        request = worker_pb2.GenerateRequest(
            messages=[user("a b c d")], sampling=worker_pb2.SamplingParams(max_tokens=16)
        )
        responses = [r async for r in stub.Generate(request)]
    # Each message says what it is: accepted first (alone), the end last.
    assert [r.HasField("accepted") for r in responses] == [True] + [False] * (len(responses) - 1)
    assert responses[0].accepted.prompt_tokens == 5 and not responses[0].HasField("delta")
    assert [r.HasField("end") for r in responses] == [False] * (len(responses) - 1) + [True]
    text = "".join(r.delta.text for r in responses)
    assert text.split() == ["a", "b", "c", "d"] * 4
    assert sum(len(r.delta.token_ids) for r in responses) == 16
    end = responses[-1].end
    assert end.finish_reason == "length" and end.usage.completion_tokens == 16 and end.usage.prompt_tokens == 5
    assert len(responses) < 1 + 16
    # Not streamed to anyone (the unary form the gateway uses for
    # non-streamed requests): one message carries the whole choice.
    async with grpc.aio.insecure_channel(echo_system.chat_workers[0].address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        reply = await stub.GenerateChoice(worker_pb2.GenerateChoiceRequest(request=request))
    assert reply.choice.accepted.prompt_tokens == 5
    assert reply.choice.delta.text == text and reply.choice.end == end
    assert len(reply.choice.delta.token_ids) == 16


def live_workers(address: str, model: str) -> int:
    """The gateway's count of live workers for ``model`` (0 before one registered)."""
    with grpc.insecure_channel(address) as channel:
        models = api_pb2_grpc.InferenceServiceStub(channel).ListModels(api_pb2.ListModelsRequest(), timeout=5)
    return next((m.workers for m in models.data if m.id == model), 0)


async def test_stream_interval_holds_messages_for_tokens() -> None:
    # --stream-interval 4 on a worker making one token every 5 ms: after the
    # first token (sent at once, for the time to first token), every message
    # but the last carries at least 4 tokens, and the text is unchanged.
    gateway = harness.gateway()
    worker = harness.echo_worker(
        gateway.address, CHAT_MODEL, "--echo-delay", "0.005", "--echo-tokens", "64", "--stream-interval", "4"
    )
    try:
        await asyncio.to_thread(harness.wait_until, lambda: live_workers(gateway.address, CHAT_MODEL) == 1)
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = api_pb2_grpc.InferenceServiceStub(channel)
            request = api_pb2.StreamChatCompletionRequest(
                request=api_pb2.CreateChatCompletionRequest(model=CHAT_MODEL, messages=[user("a b c d")], max_tokens=22)
            )
            chunks = [c async for c in stub.StreamChatCompletion(request)]
        words = [len(c.choices[0].delta.content.split()) for c in chunks if c.choices and c.choices[0].delta.content]
        assert sum(words) == 22
        assert words[0] == 1
        assert all(n >= 4 for n in words[1:-1]) and len(words) <= 2 + 21 // 4
        text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
        assert text.split() == (["a", "b", "c", "d"] * 6)[:22]
    finally:
        worker.stop()
        gateway.stop()


EVENT_ENGINE = "event_engine_client,event_engine_listener,event_engine_for_all_other_endpoints"


@pytest.mark.parametrize(
    ("experiments", "used", "unused"),
    [("", "tcp_posix.cc", "posix_endpoint.cc"), (EVENT_ENGINE, "posix_endpoint.cc", "tcp_posix.cc")],
    ids=["by-default-classic-poller", "event-engine-when-asked"],
)
def test_parts_run_grpcs_classic_poller_unless_the_user_names_the_experiments(
    experiments: str, used: str, unused: str
) -> None:
    """grpc's own TCP trace names the source file that moves the bytes: iomgr's ``tcp_posix.cc``
    for the classic poller (common/__init__.py), the event engine's ``posix_endpoint.cc``."""
    env = {"GRPC_EXPERIMENTS": experiments, "GRPC_VERBOSITY": "debug", "GRPC_TRACE": "tcp"}
    gateway = harness.gateway(env=env)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gateway.stop()
    log = gateway.log()
    assert used in log and unused not in log, log[-2000:]
