"""Limits before work, through real processes: a gateway, the real llama_cpp
worker (SmolLM2, context 8,192: where tokenizing costs), an echo embedding
worker (refused before it is called), and the REST bridge.

CPU is read from /proc/<pid>/stat (utime + stime of every thread), never timed.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import openai
import pytest

from common.errors import ApiError
from tests import harness
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.models

TOKEN = "admission-cluster-token"
CHAT = "smollm2-135m-instruct"
EMBED = "echo-embedding"
MB = 1_000_000
TICKS = os.sysconf("SC_CLK_TCK")
# Our stubs may send what the parts must refuse.
BIG = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


@dataclass
class System:
    gateway: harness.Proc
    chat: harness.Proc
    embed: harness.Proc
    bridge: harness.Proc
    # A bridge that accepts bodies larger than the gateway's message limit.
    wide_bridge: harness.Proc


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    env = {"TOKENWIRE_CLUSTER_TOKEN": TOKEN}
    gateway = harness.gateway(env=env)
    chat = harness.worker(gateway.address, "--engine", "llama_cpp", env=env)
    embed = harness.worker(
        gateway.address,
        *("--engine", "echo", "--echo-kind", "embedding", "--model-name", EMBED),
        *("--echo-context-length", "32768"),
        env=env,
    )
    bridge = harness.bridge(gateway.address)
    wide = harness.bridge(gateway.address, "--max-body-bytes", str(32 << 20))
    harness.wait_for_models(f"http://{bridge.address}", [CHAT, EMBED])
    yield System(gateway, chat, embed, bridge, wide)
    for proc in (wide, bridge, embed, chat, gateway):
        proc.stop()


def cpu(*procs: harness.Proc) -> float:
    total = 0
    for proc in procs:
        assert proc.process is not None
        with open(f"/proc/{proc.process.pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def prose(size: int) -> str:
    return ("All work and no play makes Jack a dull boy. " * (size // 44 + 1))[:size]


def random_text(seed: int) -> str:
    """Characters of many scripts and widths, spaces and punctuation runs, at random."""
    rng = random.Random(seed)
    alphabet = "abcxyz ABC  \n\t-=#_.,;!? éüß ЖЯж ΩΣ 東京日本 한국 العربية 🙂🚀 \u200b\u0301"
    return "".join(rng.choice(alphabet) * rng.choice((1, 1, 1, 3, 40)) for _ in range(3000))


def stub(address: str) -> api_pb2_grpc.InferenceServiceStub:
    return api_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address, options=BIG))


def refusal(call) -> tuple[grpc.StatusCode, ApiError]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), ApiError.from_rpc_error(caught.value)


def worker_info(system: System) -> common_pb2.ModelInfo:
    with grpc.insecure_channel(system.chat.address) as channel:
        return (
            worker_pb2_grpc.WorkerServiceStub(channel)
            .GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=5, metadata=harness.cluster_metadata(TOKEN))
            .model
        )


def chat_request(text: str) -> api_pb2.CreateChatCompletionRequest:
    return api_pb2.CreateChatCompletionRequest(
        model=CHAT, messages=[common_pb2.ChatMessage(role="user", content=text)], max_tokens=1
    )


# -- the bound itself ---------------------------------------------------------------


def test_llama_worker_reports_a_bound_its_tokenizer_keeps(system: System) -> None:
    info = worker_info(system)
    assert info.context_length == 8192 and 4 <= info.max_token_bytes <= 256
    api = stub(system.gateway.address)
    texts = [
        prose(5000),
        " " * 3000,
        "\n" + " " * 80 + "x" * 500,
        "<|im_start|><|im_end|>" * 40,  # special tokens' text, parsed as one token each
        "ünïcødé 東京 🙂 " * 100,
        "-" * 2000 + "=" * 2000,
        *(random_text(seed) for seed in range(4)),
    ]
    for text in texts:
        count = api.Tokenize(api_pb2.TokenizeRequest(model=CHAT, prompt=text), timeout=30).count
        assert count >= math.ceil(len(text.encode()) / info.max_token_bytes), text[:40]


# -- a 6 MB prompt: refused from its size ---------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_6mb_prompt_over_grpc_is_refused_for_under_100ms_of_cpu(system: System, kind: str) -> None:
    text = prose(6 * MB)
    api = stub(system.gateway.address)
    if kind == "chat":
        request, method = chat_request(text), api.CreateChatCompletion
    else:
        request = api_pb2.CreateCompletionRequest(model=CHAT, prompt=[common_pb2.TextOrTokens(text=text)], max_tokens=1)
        method = api.CreateCompletion
    before = cpu(system.gateway, system.chat)
    code, error = refusal(lambda: method(request, timeout=120))
    used = cpu(system.gateway, system.chat) - before
    assert code == grpc.StatusCode.INVALID_ARGUMENT and error.code == "context_length_exceeded"
    assert error.param == ("messages" if kind == "chat" else "prompt")
    assert error.message.startswith("This model's maximum context length is 8192 tokens. However, you requested")
    assert used < 0.1, f"{used * 1000:.0f} ms of gateway + worker CPU"


def test_6mb_prompt_through_rest_is_refused_for_under_100ms_of_cpu(system: System) -> None:
    client = openai.OpenAI(base_url=f"http://{system.bridge.address}/v1", api_key="none", max_retries=0, timeout=120)
    text = prose(6 * MB)  # under the bridge's 10 MiB body limit
    before = cpu(system.gateway, system.chat)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": text}], max_tokens=1)
    used = cpu(system.gateway, system.chat) - before
    assert caught.value.status_code == 400 and caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    assert used < 0.1, f"{used * 1000:.0f} ms of gateway + worker CPU"


def test_worker_called_directly_refuses_before_tokenizing(system: System) -> None:
    request = worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=prose(6 * MB))],
        sampling=worker_pb2.SamplingParams(max_tokens=1),
    )
    with grpc.insecure_channel(system.chat.address, options=BIG) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        before = cpu(system.chat)
        code, error = refusal(
            lambda: list(worker.Generate(request, timeout=120, metadata=harness.cluster_metadata(TOKEN)))
        )
        used = cpu(system.chat) - before
    assert code == grpc.StatusCode.INVALID_ARGUMENT and error.code == "context_length_exceeded"
    assert used < 0.1, f"{used * 1000:.0f} ms of worker CPU"


def test_a_prompt_that_may_fit_is_still_counted_exactly(system: System) -> None:
    """Under the bound, the worker's token count decides, as before."""
    info = worker_info(system)
    # Few enough bytes to pass the size check, too many tokens: one space-separated letter each.
    text = "a " * (8192 * info.max_token_bytes // 2 // 2)
    code, error = refusal(lambda: stub(system.gateway.address).CreateChatCompletion(chat_request(text), timeout=120))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and error.code == "context_length_exceeded"
    assert "at least" not in error.message  # counted by the tokenizer


# -- over-size gRPC messages -----------------------------------------------------------


def test_oversize_message_to_the_gateway_is_resource_exhausted(system: System) -> None:
    code, error = refusal(
        lambda: stub(system.gateway.address).CreateChatCompletion(chat_request("x" * (11 << 20)), timeout=30)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.http_status == 413 and error.code == "request_too_large"
    assert error.message.startswith("The request is larger than the server's gRPC message size limit")


def test_oversize_message_to_a_worker_is_resource_exhausted(system: System) -> None:
    request = worker_pb2.GenerateChoiceRequest(
        request=worker_pb2.GenerateRequest(prompt=common_pb2.TextOrTokens(text="x" * (11 << 20)))
    )
    with grpc.insecure_channel(system.chat.address, options=BIG) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        code, _ = refusal(lambda: worker.GenerateChoice(request, timeout=30, metadata=harness.cluster_metadata(TOKEN)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("stream", [False, True])
def test_oversize_message_through_rest_is_413(system: System, stream: bool) -> None:
    client = openai.OpenAI(
        base_url=f"http://{system.wide_bridge.address}/v1", api_key="none", max_retries=0, timeout=60
    )
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "x" * (12 << 20)}], stream=stream
        )
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"  # type: ignore[index]


# -- OpenAI's embeddings limits, before the model runs -------------------------------


def embed_requests(system: System) -> int:
    return harness.worker_stats(system.embed.address, TOKEN).requests_total


def ids(n: int) -> common_pb2.TextOrTokens:
    return common_pb2.TextOrTokens(tokens=common_pb2.TokenIds(ids=[7] * n))


@pytest.mark.parametrize(
    ("inputs", "code", "words"),
    [
        ([ids(3)] * 2049, None, "2048"),
        ([ids(10), ids(8193)], "context_length_exceeded", "input[1] is 8193 tokens long"),
        ([ids(8192)] * 37, "max_tokens_per_request", "Requested 303104 tokens, max 300000 tokens per request"),
    ],
    ids=["2049 inputs", "8193 tokens in one input", "303104 tokens in all"],
)
def test_embeddings_limits_answer_400_without_the_model(
    system: System, inputs: list[common_pb2.TextOrTokens], code: str | None, words: str
) -> None:
    before = embed_requests(system)
    status, error = refusal(
        lambda: stub(system.gateway.address).CreateEmbedding(
            api_pb2.CreateEmbeddingRequest(model=EMBED, input=inputs), timeout=30
        )
    )
    assert status == grpc.StatusCode.INVALID_ARGUMENT and error.http_status == 400
    assert error.param == "input" and error.code == code and words in error.message
    assert embed_requests(system) == before  # the worker was never called
    # Within the limits, the same worker answers.
    fine = api_pb2.CreateEmbeddingRequest(model=EMBED, input=[ids(8192)] * 36)
    assert len(stub(system.gateway.address).CreateEmbedding(fine, timeout=30).data) == 36


def test_embeddings_limits_through_rest(system: System) -> None:
    client = openai.OpenAI(base_url=f"http://{system.bridge.address}/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBED, input=[[7] * 8192] * 37)
    assert caught.value.param == "input" and caught.value.code == "max_tokens_per_request"


def test_a_response_over_the_send_limit_is_resource_exhausted_and_says_so() -> None:
    gateway = harness.gateway("--max-send-message-length", "4000")
    worker = harness.echo_worker(gateway.address, "small-send", "--echo-kind", "embedding")
    try:
        api = stub(gateway.address)
        harness.wait_until(lambda: any(m.id == "small-send" for m in api.ListModels(api_pb2.ListModelsRequest()).data))
        few = api_pb2.CreateEmbeddingRequest(model="small-send", input=[common_pb2.TextOrTokens(text="hi")] * 2)
        assert len(api.CreateEmbedding(few, timeout=10).data) == 2
        many = api_pb2.CreateEmbeddingRequest(model="small-send", input=[common_pb2.TextOrTokens(text="hi")] * 100)
        code, error = refusal(lambda: api.CreateEmbedding(many, timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.http_status == 413 and error.message.startswith("The response to this request is larger")
    finally:
        worker.stop()
        gateway.stop()
