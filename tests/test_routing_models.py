"""Cache-aware routing over two real llama.cpp workers (SmolLM2-135M): a conversation's turns
land on one worker and reuse its cache, ``cached_tokens`` shows through the openai SDK on all three
APIs, and a prefix the worker evicted is forgotten by the gateway's index."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import openai
import pytest

from tests import harness
from tokenwire.v1 import common_pb2, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.models

MODEL = "smollm2-135m-instruct"
# Long enough that a turn's prompt spans several of the cache's chunks.
SYSTEM = {
    "role": "system",
    "content": "You are a gardening assistant for people who live by rivers. " * 8 + "Answer in one sentence.",
}


@dataclass
class Stack:
    gateway: harness.Proc
    workers: list[harness.Proc]
    bridge: harness.Proc
    metrics_port: int

    def served(self) -> list[int]:
        return [harness.worker_stats(w.address).requests_total for w in self.workers]

    def landed(self, before: list[int]) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(before, self.served(), strict=True)) if b > a]

    def metrics(self) -> dict[str, float]:
        return harness.scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    port = free_port()
    gateway = harness.gateway("--metrics-port", str(port))
    # One sequence and one kept prefix each, no host prompt cache: a worker holds one conversation,
    # so that another one evicts it.
    flags = ["--engine", "llama_cpp", "--n-ctx", "2048", "--parallel", "1", "--prefix-cache", "1"]
    flags += ["--prompt-cache-mib", "0", "--n-threads", "1", "--n-threads-batch", "1"]
    workers = [harness.worker(gateway.address, *flags) for _ in range(2)]
    bridge = harness.bridge(gateway.address)
    harness.wait_for_workers(f"http://{bridge.address}", MODEL, 2)
    yield Stack(gateway, workers, bridge, port)
    for proc in (bridge, *workers, gateway):
        proc.stop()


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{stack.bridge.address}/v1", api_key="none", max_retries=0, timeout=300)


def cached(usage: Any) -> int:
    assert usage is not None and usage.prompt_tokens_details is not None
    return int(usage.prompt_tokens_details.cached_tokens)


def test_a_conversations_turns_land_on_one_worker_and_reuse_its_cache(stack: Stack, client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": "What grows well in wet soil?"}]
    before, hits = stack.served(), []
    for turn in range(3):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
        hits.append(cached(reply.usage))
        assert reply.usage is not None and hits[-1] < reply.usage.prompt_tokens
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": f"Tell me one more thing, number {turn}."},
        ]
    assert len(stack.landed(before)) == 1
    assert 0 < hits[1] < hits[2]  # each turn reuses the conversation so far


def test_cached_tokens_through_the_sdk_on_all_three_apis(stack: Stack, client: openai.OpenAI) -> None:
    # Chat, streamed: the usage chunk.
    messages = [SYSTEM, {"role": "user", "content": "Name a tree that likes water."}]
    for _ in range(2):
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert cached(chunks[-1].usage) > 0
    # Completions: the same prompt twice.
    prompt = "The river flows past the old mill, and the gardener plants willows along its banks because"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert cached(first.usage) < cached(second.usage) and cached(second.usage) > 0
    # Responses: a previous_response_id chain, on one worker.
    before = stack.served()
    reply = client.responses.create(
        model=MODEL, instructions=SYSTEM["content"], input="Name a flower.", max_output_tokens=8
    )
    reply = client.responses.create(
        model=MODEL,
        instructions=SYSTEM["content"],
        input="And a shrub?",
        previous_response_id=reply.id,
        max_output_tokens=8,
    )
    assert reply.usage is not None and reply.usage.input_tokens_details.cached_tokens > 0
    assert len(stack.landed(before)) == 1


def test_an_evicted_prefix_is_forgotten(stack: Stack, client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": "Which herbs like shade?"}]
    before = stack.served()
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    (home,) = stack.landed(before)
    # Another conversation, straight to that worker, takes its one kept prefix.
    other = worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content="Count slowly from one to twenty, in words, please.")],
        sampling=worker_pb2.SamplingParams(max_tokens=4),
    )
    with grpc.insecure_channel(stack.workers[home].address) as channel:
        worker_pb2_grpc.WorkerServiceStub(channel).GenerateChoice(
            worker_pb2.GenerateChoiceRequest(request=other), timeout=300
        )
    forgotten = f'tokenwire_routing_forgotten_prefixes_total{{model="{MODEL}"}}'
    was = stack.metrics().get(forgotten, 0.0)
    messages += [
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "And which like sun?"},
    ]
    before = stack.served()
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert stack.landed(before) == [home]  # the index still thought it held the conversation
    assert reply.usage is not None and cached(again.usage) < reply.usage.prompt_tokens // 2
    assert stack.metrics()[forgotten] > was
    predicted = stack.metrics()[f'tokenwire_routing_predicted_cached_tokens_total{{model="{MODEL}"}}']
    reported = stack.metrics()[f'tokenwire_routing_reported_cached_tokens_total{{model="{MODEL}"}}']
    assert predicted > 0 and reported > 0
